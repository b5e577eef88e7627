"""An LLM judge: an instruction-tuned model served by Ollama scores each answer of a responses file 0-100
(Raschka's chapter 7, ollama_evaluate.py). Any script that writes [{instruction, input, output,
model_response}] can have its answers judged: finetune_instruct.py --judge FILE."""

import re

from cli import progress_bar
from errors import UserError
from files import lock_file, write_json
from instruction import format_prompt, load_entries

OLLAMA_URL = "http://localhost:11434"
JUDGE_MODEL = "llama3"
JUDGE_RETRIES = 2  # extra tries when the judge's reply is not a number
JUDGE_TIMEOUT = 300  # seconds; a big judge on a CPU is slow
JUDGE_PROMPT = (
    "Given the input `{prompt}` and correct output `{output}`, score the model response `{response}`"
    " on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
)
JUDGE_REMINDER = "That is not a score. Respond with one integer from 0 to 100 and nothing else."


def add_judge_args(parser):
    parser.add_argument("--judge", metavar="RESPONSES",
                        help="score this responses JSON with the Ollama judge instead of training")
    parser.add_argument("--ollama-url", default=OLLAMA_URL)
    parser.add_argument("--judge-model", default=JUDGE_MODEL)
    parser.add_argument("--rescore", action="store_true",
                        help="with --judge: score every entry again, not only those without a score")


def ask_ollama(url, model, messages, seed):
    """One non-streamed reply from Ollama's /api/chat, deterministic (temperature 0, fixed seed)."""
    import requests

    body = {"model": model, "messages": messages, "stream": False,
            "options": {"temperature": 0, "seed": seed}}
    try:
        r = requests.post(f"{url.rstrip('/')}/api/chat", json=body, timeout=JUDGE_TIMEOUT)
    except requests.ConnectionError as e:
        if "refused" in str(e) or "resolve" in str(e).lower() or "Name or service" in str(e):
            raise UserError(f"cannot reach Ollama at {url}: start it with `ollama serve`, or pass "
                            "--ollama-url") from None
        raise UserError(f"Ollama at {url} closed the connection before it answered (did it stop or run out "
                        "of memory?): check `ollama serve`'s log and run again") from None
    except requests.Timeout:
        raise UserError(f"Ollama at {url} gave no answer in {JUDGE_TIMEOUT} s") from None
    except requests.RequestException as e:  # a reply cut off halfway
        raise UserError(f"Ollama at {url} stopped halfway through its reply ({type(e).__name__}): check "
                        "`ollama serve`'s log and run again") from None
    try:
        reply = r.json()
    except ValueError:
        reply = {}
    # an HTML error page, as one line of its text
    page = " ".join(re.sub(r"<[^>]*>", " ", r.text).split())[:200]
    error = reply.get("error", page) if isinstance(reply, dict) else page
    if r.status_code == 404 and "not found" in str(error) and "model" in str(error):
        raise UserError(f"Ollama at {url} has no model {model!r} ({error}): run `ollama pull {model}`, "
                        "or pass --judge-model")
    if not r.ok:
        raise UserError(f"Ollama at {url} answered HTTP {r.status_code}: {error}")
    content = reply.get("message", {}).get("content") if isinstance(reply, dict) else None
    if not isinstance(content, str):
        raise UserError(f"{url}/api/chat did not answer with Ollama's chat JSON (a message with text "
                        "content): is it an Ollama server?")
    return content


def parse_score(reply):
    """'85' (spaces or a final '.' allowed) -> 85; anything that is not one number in 0..100 -> None."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*\.?\s*", reply)
    if m is None or float(m.group(1)) > 100:
        return None
    score = float(m.group(1))
    return int(score) if score.is_integer() else score


def judge(entry, url, model, seed):
    """The judge's score for entry["model_response"], or None when it never replies with a number."""
    prompt = JUDGE_PROMPT.format(prompt=format_prompt(entry), output=entry["output"],
                                 response=entry["model_response"])
    messages = [{"role": "user", "content": prompt}]
    for _ in range(1 + JUDGE_RETRIES):
        reply = ask_ollama(url, model, messages, seed)
        score = parse_score(reply)
        if score is not None:
            return score, reply
        # Same prompt, temperature 0 and seed would give the same reply: point out the mistake instead.
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": JUDGE_REMINDER}]
    return None, reply


def score_responses(args):
    """Score the entries of args.judge that have no score yet (every one with args.rescore). Each score is
    written into the file as soon as it comes, whole: Ctrl-C, SIGTERM or a judge that dies keeps every score
    given so far, and a run again scores only what is left. An entry the judge gives no score keeps the one
    it had (an earlier run's, or null)."""
    path = args.judge
    entries = load_entries(path, required=("instruction", "output", "model_response"))
    lock_file(path)
    todo = [i for i, e in enumerate(entries) if args.rescore or e.get("score") is None]
    if not todo:
        print(f"every entry of {path} has a score already: pass --rescore to score them again")
    scores, failed = {}, 0
    try:
        for i in progress_bar(todo, desc=f"judging with {args.judge_model}"):
            score, reply = judge(entries[i], args.ollama_url, args.judge_model, args.seed)
            if score is None:
                failed += 1
                entries[i].setdefault("score", None)
                print(f"entry {i}: the judge's reply {reply[:80]!r} is not a score after "
                      f"{1 + JUDGE_RETRIES} tries: counted as failed")
                continue
            print(f"entry {i}: score {score}")
            scores[i] = entries[i]["score"] = score
            write_json(entries, path)
    except (UserError, KeyboardInterrupt):
        if scores:
            print(f"{len(scores)} new scores are kept in {path}; run the same command again to score the "
                  "rest")
        raise
    if todo and not scores:
        raise UserError(f"the judge gave no score to any of the {len(todo)} entries: {path} is left as it "
                        "was")
    if failed:
        write_json(entries, path)  # the failed ones as null, where they had no score before
    valid = [e["score"] for e in entries if e.get("score") is not None]
    if valid:
        print(f"mean score {sum(valid) / len(valid):.2f} over {len(valid)} entries"
              + (f" ({failed} failed, not counted; they keep their earlier score)" if failed else "")
              + f"; scores written to {path}")
