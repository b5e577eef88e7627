"""finetune_summarize.py: the TL;DR prompt and its batches, long posts and bad records, and the whole run
(download, training, summaries, ROUGE against both baselines, the judge) on a fixture of invented Reddit
posts in tests/data/tldr/, served by a local HTTP server as OpenAI's host serves the real files."""

import json
import shutil
import threading
from http.server import ThreadingHTTPServer

import pytest
import torch
from rouge_score import rouge_scorer

import finetune_summarize as fs
from errors import UserError
from gpt2 import GPT, GPTConfig, Tokenizer
from instruction import IGNORE, collate
from tests.helpers import (EOT, ROOT, FakeOllama, assert_bitwise_equal, one_line_error, run_in_process,
                           snapshot, train_load)
from tests.test_download import HUB_COMMIT, _DlHandler

FIXTURE = ROOT / "tests" / "data" / "tldr"  # train.jsonl (24 posts), valid.jsonl (6), test.jsonl (6)
SUM_TINY = ("--init-from", "scratch", "--n-layer", 2, "--n-head", 4, "--n-embd", 64, "--context-length", 256,
            "--batch-size", 4, "--eval-batches", 1, "--lr", 1e-3, "--max-new-tokens", 8)
SEED = 123  # --seed's default
PARTIAL = 4000  # bytes of train.jsonl an interrupted download left


def fixture_records(split):
    return [json.loads(line) for line in (FIXTURE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def rouge_means(pairs):
    """rouge-score itself, called directly: the mean F1 of each ROUGE over (reference, summary) pairs."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, summary) for ref, summary in pairs]
    return {k: sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}


# -----------------------------------------------------------------------------
# Prompt, batches, long posts


def test_summarize_default_data_is_openais_filtered_tldr():
    assert fs.DATA_URL == ("https://openaipublic.blob.core.windows.net/summarize-from-feedback/datasets/"
                           "tldr_3_filtered")
    assert fs.DATA == "data/tldr" and fs.SPLITS == ("train", "valid", "test")


def test_summarize_prompt_is_tldrs_byte_for_byte():
    record = {"id": "t3_x", "subreddit": "cats", "title": "Kitten cries all night",
              "post": "She cries.\nWe're tired.", "summary": "Kitten cries at night. "}
    assert fs.tldr_prompt(record) == ("SUBREDDIT: r/cats\n\nTITLE: Kitten cries all night\n\n"
                                      "POST: She cries.\nWe're tired.\n\nTL;DR:")
    assert fs.tldr_prompt({"document": "A long article.", "summary": "Short."}) == "A long article.\n\nTL;DR:"
    assert fs.target(record) == " Kitten cries at night."  # one space after "TL;DR:", as OpenAI's " {reference}"
    tok = Tokenizer()
    [(_, prompt, (ids, prompt_len))] = fs.prepare(tok, {"train": [record]}, 256, "cut")[0]["train"]
    assert prompt.encode() == fs.tldr_prompt(record).encode()
    assert tok.decode(ids[:prompt_len]) == prompt
    assert tok.decode(ids[prompt_len:]) == " Kitten cries at night.<|endoftext|>"


def test_summarize_batches_count_only_the_summary_tokens():
    """The targets of a collated batch of fixture posts, token by token: -100 over each prompt (but its last
    position, which predicts the summary's first token), then the summary and one <|endoftext|>, then -100
    over the padding."""
    tok = Tokenizer()
    records = fixture_records("train")[:4]
    examples = [e for _, _, e in fs.prepare(tok, {"train": records}, 256, "cut")[0]["train"]]
    inputs, targets = collate(examples, EOT, mask_prompt=True, max_length=256)
    assert inputs.shape == targets.shape == (4, max(len(ids) for ids, _ in examples) - 1)
    for row, (record, (ids, prompt_len)) in enumerate(zip(records, examples)):
        summary = tok.encode(" " + record["summary"])
        expected = [IGNORE] * (prompt_len - 1) + summary + [EOT]
        expected += [IGNORE] * (targets.shape[1] - len(expected))
        assert targets[row].tolist() == expected
        assert inputs[row, :len(ids) - 1].tolist() == ids[:-1]


def test_summarize_posts_too_long_are_cut_from_their_end_or_skipped(capsys):
    tok = Tokenizer()
    short, long = fixture_records("test")[:2]
    long = {**long, "post": " ".join([long["post"]] * 6)}  # about 400 tokens; short is 100
    tiny = {**short, "title": "word " * 120}  # title and summary alone are longer than 128 tokens
    examples, counts = fs.prepare(tok, {"train": [short, long, tiny]}, 128, "cut")
    assert "2 of 3 posts cut to fit 128 tokens (1 dropped: their title and summary alone are longer)" \
           in capsys.readouterr().out
    assert counts == {"posts": 3, "too_long": 2, "dropped": 1}
    (r0, p0, (ids0, _)), (r1, p1, (ids1, n1)) = examples["train"]
    assert p0 == fs.tldr_prompt(short) and r1 is long
    head, _, cut_post = p1.removesuffix("\n\nTL;DR:").partition("POST: ")
    assert head + "POST: " == fs.tldr_prompt({**long, "post": ""}).removesuffix("\n\nTL;DR:")
    assert long["post"].startswith(cut_post) and 0 < len(cut_post) < len(long["post"])
    assert 120 <= len(ids1) <= 128  # as much of the post as fits
    assert tok.decode(ids1[n1:]) == fs.target(long) + "<|endoftext|>"  # the summary is whole
    examples, _ = fs.prepare(tok, {"train": [short, long]}, 128, "skip")
    assert "1 of 2 posts skipped: longer than 128 tokens" in capsys.readouterr().out
    assert [r for r, _, _ in examples["train"]] == [short]
    with pytest.raises(UserError, match="no validation post fits in 128 tokens: raise --context-length"):
        fs.prepare(tok, {"train": [short], "val": [tiny]}, 128, "cut")


def test_summarize_zero_shot_keeps_at_most_three_sentences():
    text = "I moved. She stopped replying! Did I do something? I miss her. The end"
    assert fs.first_sentences(text, 3) == "I moved. She stopped replying! Did I do something?"
    assert fs.first_sentences("It costs 3.5 dollars... really?! Yes", 3) == "It costs 3.5 dollars... really?! Yes"
    assert fs.first_sentences("no end at all", 3) == "no end at all"
    assert fs.title_of({"document": "First one. Second one.", "summary": "s"}) == "First one."


# -----------------------------------------------------------------------------
# The whole run: the data downloaded from a local server (a partial file an earlier run left resumed, a
# transfer dropped halfway tried again), a tiny model from scratch trained, the test posts summarised,
# scored and judged.


@pytest.fixture(scope="module")
def tldr_run(tmp_path_factory):
    """finetune_summarize.py run with the default --data in a fresh folder that holds the first PARTIAL bytes
    of train.jsonl in train.jsonl.part, --data-url pointing at a local server of the fixture that drops
    valid.jsonl's first transfer halfway -> (the folder, the run, the requests the server got)."""
    files = {f"/{name}.jsonl": (FIXTURE / f"{name}.jsonl").read_bytes() for name in fs.SPLITS}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DlHandler)
    server.__dict__.update(files=files, requests=[], cut_once={"/valid.jsonl"}, ignore_range=False,
                           portal=None, commit=HUB_COMMIT)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    folder = tmp_path_factory.mktemp("summarize")
    (folder / "data" / "tldr").mkdir(parents=True)
    (folder / "data" / "tldr" / "train.jsonl.part").write_bytes(files["/train.jsonl"][:PARTIAL])
    try:
        r = run_in_process("finetune_summarize.py", *SUM_TINY, "--data-url",
                           f"http://127.0.0.1:{server.server_port}", "--max-examples", 12,
                           "--eval-examples", 4, "--max-iters", 4, "--eval-interval", 2, "--out-dir", "out", cwd=folder)
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 0, r.stderr[-3000:]
    return folder, r, server.requests


def test_summarize_downloads_tldr_into_data_resuming_a_dropped_transfer(tldr_run):
    folder, r, requests = tldr_run
    for name in fs.SPLITS:
        got = (folder / "data" / "tldr" / f"{name}.jsonl").read_bytes()
        assert got == (FIXTURE / f"{name}.jsonl").read_bytes()
    assert requests[0] == ("/train.jsonl", f"bytes={PARTIAL}-")  # only what the partial file lacked
    assert [path for path, _ in requests[1:]] == ["/valid.jsonl", "/valid.jsonl", "/test.jsonl"]  # a retry
    assert "retry 1/2" in r.stderr
    assert not list((folder / "data" / "tldr").glob("*.part"))
    assert "data/tldr: 12 train (of 24), 3 validation (of 6), 4 test (of 6) posts" in r.stdout
    assert "0 of 19 posts cut to fit 256 tokens" in r.stdout
    for step in (0, 2, 4):
        assert f"step {step} (epoch" in r.stdout


def test_summarize_writes_each_greedy_summary_beside_its_reference(tldr_run):
    """summaries.json: the first 4 test posts, each with its reference and the best model's greedy summary
    (plain argmax, one post at a time, cut at <|endoftext|>), in the format the judge reads."""
    folder, _, _ = tldr_run
    entries = json.loads((folder / "out" / "summaries.json").read_text(encoding="utf-8"))
    records = fixture_records("test")[:4]
    assert [(e["instruction"], e["input"], e["output"], e["id"]) for e in entries] == \
           [(fs.INSTRUCTION, r["post"], r["summary"], r["id"]) for r in records]
    model, tok = GPT.from_pretrained(str(folder / "out" / "best.pt")), Tokenizer()
    assert model.config.n_ctx == 256
    assert torch.load(folder / "out" / "best.pt", weights_only=True)["step"] in (0, 2, 4)
    for entry, record in zip(entries, records):
        ids = tok.encode(fs.tldr_prompt(record))
        with torch.no_grad():
            for _ in range(8):  # --max-new-tokens
                next_id = model(torch.tensor([ids]))[0][0, -1].argmax().item()
                if next_id == EOT:
                    break
                ids.append(next_id)
        assert entry["model_response"] == tok.decode(ids[len(tok.encode(fs.tldr_prompt(record))):]).strip()


def test_summarize_baselines_are_the_title_and_the_starting_model_zero_shot(tldr_run):
    """The title baseline is each post's title; the zero-shot one, the first three sentences of what the model
    it started from (the same seed's initial weights) samples after "TL;DR:" with top-k 2, 4 posts a batch."""
    folder, _, _ = tldr_run
    entries = json.loads((folder / "out" / "summaries.json").read_text(encoding="utf-8"))
    records = fixture_records("test")[:4]
    assert [e["title_baseline"] for e in entries] == [r["title"] for r in records]
    torch.manual_seed(SEED)
    start = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, n_ctx=256)).eval()  # build_model's, from scratch
    tok = Tokenizer()
    prompts = [tok.encode(fs.tldr_prompt(r)) for r in records]
    torch.manual_seed(SEED)
    with torch.no_grad():
        outs = start.generate(prompts, 8, temperature=1.0, top_k=2, eos_id=EOT)
    sampled = [tok.decode([t for t in out[len(p):] if t != EOT]).strip() for p, out in zip(prompts, outs)]
    assert [e["zero_shot"] for e in entries] == [fs.first_sentences(s, 3) for s in sampled]


def test_summarize_rouge_is_rouge_score_on_the_same_pairs(tldr_run):
    folder, r, _ = tldr_run
    entries = json.loads((folder / "out" / "summaries.json").read_text(encoding="utf-8"))
    metrics = json.loads((folder / "out" / "metrics.json").read_text(encoding="utf-8"))
    for name, field in (("fine_tuned", "model_response"), ("title", "title_baseline"), ("zero_shot", "zero_shot")):
        expected = rouge_means([(e["output"], e[field]) for e in entries])
        assert metrics["rouge_f1"][name] == pytest.approx(expected, abs=1e-12), name
    title = metrics["rouge_f1"]["title"]
    assert title["rouge1"] > 0.2  # the fixture's titles share words with their summaries
    assert metrics["examples"] == {"train": 12, "validation": 3, "test": 4}
    assert metrics["args"]["max_examples"] == 12 and metrics["too_long"] == 0
    assert "ROUGE F1 x 100 on 4 test posts" in r.stdout
    assert f"{100 * title['rouge1']:9.2f}{100 * title['rouge2']:9.2f}{100 * title['rougeL']:9.2f}" in r.stdout


def test_summarize_summaries_json_is_scored_by_the_instruct_judge(tldr_run, tmp_path, serve, run_main):
    folder, _, _ = tldr_run
    path = shutil.copy(folder / "out" / "summaries.json", tmp_path / "summaries.json")
    ollama = serve(FakeOllama, model="llama3", replies=["60", "70", "80", "90"], requests=[])
    r = run_main("finetune_instruct.py", "--judge", path, "--ollama-url", ollama.url)
    assert r.returncode == 0, r.stderr
    assert "mean score 75.00 over 4 entries" in r.stdout
    entries = json.loads((tmp_path / "summaries.json").read_text(encoding="utf-8"))
    assert [e["score"] for e in entries] == [60, 70, 80, 90]
    for (_, body), entry in zip(ollama.requests, entries):
        asked = body["messages"][0]["content"]
        assert all(text in asked for text in (fs.INSTRUCTION, entry["input"], entry["output"]))


# -----------------------------------------------------------------------------
# Resume, bad input, --help


def test_summarize_resume_to_more_steps_is_the_longer_run_bitwise(tmp_path, run_main):
    """LoRA and dropout: 8 steps, against 4 then --resume --max-iters 8: the same weights, AdamW state and
    history bit for bit, and the same summaries."""
    args = [*SUM_TINY, "--data", FIXTURE, "--lora-rank", 4, "--dropout", 0.1, "--eval-interval", 4,
            "--eval-examples", 2]
    for out, steps in (("straight", 8), ("first", 4)):
        r = run_main("finetune_summarize.py", *args, "--out-dir", tmp_path / out, "--max-iters", steps)
        assert r.returncode == 0, r.stderr[-3000:]
    r = run_main("finetune_summarize.py", *args, "--out-dir", tmp_path / "first", "--max-iters", 8, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (train_load(tmp_path / out / "ckpt.pt") for out in ("straight", "first"))
    assert a["step"] == 8 and any(k.endswith(".A") for k in a["model"])
    assert_bitwise_equal(a, b)
    summaries = [(tmp_path / out / "summaries.json").read_bytes() for out in ("straight", "first")]
    assert summaries[0] == summaries[1]
    line = one_line_error(run_main("finetune_summarize.py", *args, "--out-dir", tmp_path / "first", "--resume",
                                   "--max-iters", 10, "--too-long", "skip"))
    assert "--too-long skip differs from the checkpoint's cut, and it cannot change on --resume" in line


@pytest.mark.parametrize("lines, said", [
    (['{"subreddit": "cats", "title": "t", "summary": "s"}'], "line 2: no 'post' field"),
    (['{"subreddit": "cats", "title": "t", "post": "p", "summary": "  "}'], "line 2: the summary is empty"),
    (['{"subreddit": "cats", "title": "t", "post": "p", "summary": "s"', ""], "line 2: not JSON"),
    (["", '{"document": 3, "summary": "s"}'], "line 3: 'document' is not a string"),
    (['["a list"]'], "line 2: not a JSON object"),
])
def test_summarize_bad_records_are_one_line_naming_file_and_line(tmp_path, run_main, lines, said):
    folder = tmp_path / "data"
    shutil.copytree(FIXTURE, folder)
    good = (FIXTURE / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    (folder / "valid.jsonl").write_text("\n".join([good[0], *lines, *good[1:]]) + "\n", encoding="utf-8")
    before = snapshot(folder)
    line = one_line_error(run_main("finetune_summarize.py", *SUM_TINY, "--data", folder, "--out-dir",
                                   tmp_path / "out"))
    assert f"{folder / 'valid.jsonl'} {said}" in line
    assert snapshot(folder) == before and not (tmp_path / "out").exists()


def test_summarize_a_single_file_is_split_and_a_json_list_names_the_entry(tmp_path, run_main):
    records = [*fixture_records("train"), *fixture_records("valid")]
    path = tmp_path / "posts.json"
    path.write_text(json.dumps([{"document": r["post"], "summary": r["summary"]} for r in records]))
    r = run_main("finetune_summarize.py", *SUM_TINY, "--data", path, "--out-dir", tmp_path / "out",
                 "--max-iters", 1, "--max-new-tokens", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{path}: 25 train, 2 validation, 3 test posts" in r.stdout  # 85% train, 10% test, the rest validation
    entries = json.loads((tmp_path / "out" / "summaries.json").read_text())
    assert [e["input"] for e in entries] == [r["post"] for r in records[25:28]]
    assert [e["title_baseline"] for e in entries] == [fs.first_sentences(r["post"], 1) for r in records[25:28]]
    path.write_text(json.dumps([{"document": "d", "summary": "s"}, {"document": "d"}]))
    line = one_line_error(run_main("finetune_summarize.py", *SUM_TINY, "--data", path,
                                   "--out-dir", tmp_path / "o2"))
    assert f"{path} entry 1: no 'summary' field" in line


def test_summarize_help_shows_the_shared_flags(run_main):
    r = run_main("finetune_summarize.py", "--help")
    assert r.returncode == 0
    for flag in ("--init-from", "--n-layer", "--dropout", "--lora-rank", "--lora-alpha", "--out-dir",
                 "--overwrite", "--resume", "--max-iters", "--epochs", "--batch-size", "--context-length",
                 "--lr", "--dtype", "--device", "--seed", "--data", "--data-url", "--max-examples",
                 "--eval-examples", "--too-long", "--max-new-tokens"):
        assert f"{flag} " in r.stdout, flag
    assert "tldr_3_filtered" in r.stdout  # where the data comes from, by default
