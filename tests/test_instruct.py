"""finetune_instruct.py and what it is built of (instruction.py, lora.py, judge.py): prompt, batches, LoRA,
training, and the Ollama judge against a fake server."""

import json
from http.server import BaseHTTPRequestHandler

import pytest
import torch

from finetune_instruct import split
from gpt2 import GPT, GPTConfig, Tokenizer
from instruction import IGNORE, collate, encode, format_prompt, load_entries
from judge import JUDGE_RETRIES
from lora import LoRALinear, add_lora, merge_lora
from tests.helpers import (EOT, INSTRUCT_DATA, INSTRUCT_TINY, FakeOllama, assert_bitwise_equal, free_port,
                           one_line_error, reply, stop_then_resume, tiny_model)
from trainer import configure_optimizer


def instruct_tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=EOT + 1, n_ctx=64, n_layer=2, n_head=4, n_embd=32))


# -----------------------------------------------------------------------------
# Prompt and data


def test_instruct_format_prompt_is_the_alpaca_text():
    head = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nRewrite the sentence in passive voice.")
    with_input = {"instruction": "Rewrite the sentence in passive voice.",
                  "input": "The chef cooked the meal."}
    assert format_prompt(with_input) == head + "\n\n### Input:\nThe chef cooked the meal.\n\n### Response:\n"
    assert format_prompt({**with_input, "input": ""}) == head + "\n\n### Response:\n"
    assert format_prompt({"instruction": with_input["instruction"]}) == head + "\n\n### Response:\n"


def test_instruct_split_of_the_real_data_is_the_books():
    """Chapter 7's split in file order: the first 935 train, the next 110 test, the last 55 validate."""
    entries = load_entries(INSTRUCT_DATA)
    train, val, test = split(entries)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train == entries[:935] and test == entries[935:1045] and val == entries[1045:]


# -----------------------------------------------------------------------------
# Batches


def test_instruct_collate_masks_token_by_token():
    batch = [([1, 2, 3, 4, EOT], 3), ([5, 6, EOT], 1)]  # (ids ending with <|endoftext|>, prompt length)
    inputs, targets = collate(batch, EOT)
    assert inputs.tolist() == [[1, 2, 3, 4], [5, 6, EOT, EOT]]
    # first end-of-text kept, padding ignored
    assert targets.tolist() == [[2, 3, 4, EOT], [6, EOT, IGNORE, IGNORE]]
    _, masked = collate(batch, EOT, mask_prompt=True)
    assert masked.tolist() == [[IGNORE, IGNORE, 4, EOT], [6, EOT, IGNORE, IGNORE]]  # only answer tokens count
    inputs, targets = collate(batch, EOT, mask_prompt=True, max_length=3)
    assert inputs.tolist() == [[1, 2, 3], [5, 6, EOT]]
    assert targets.tolist() == [[IGNORE, IGNORE, 4], [6, EOT, IGNORE]]


def instruct_book_collate(batch, pad_token_id=EOT, ignore_index=-100, allowed_max_length=None):
    """Raschka's custom_collate_fn (chapter 7), as printed in the book: the reference."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy()
        new_item += [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


def test_instruct_collate_of_real_entries_matches_the_book_and_masks_the_prompt():
    tok = Tokenizer()
    entries = load_entries(INSTRUCT_DATA)[:8]
    batch = [encode(tok, format_prompt(e), e["output"]) for e in entries]
    for entry, (ids, prompt_len) in zip(entries, batch):
        assert tok.decode(ids[:prompt_len]) == format_prompt(entry)
        assert tok.decode(ids[prompt_len:]) == entry["output"] + "<|endoftext|>"
    book = [tok.encode(format_prompt(e) + e["output"]) for e in entries]
    for max_length in (None, 40):
        inputs, targets = collate(batch, EOT, max_length=max_length)
        ref_inputs, ref_targets = instruct_book_collate(book, allowed_max_length=max_length)
        assert torch.equal(inputs, ref_inputs) and torch.equal(targets, ref_targets)
    _, masked = collate(batch, EOT, mask_prompt=True)
    for row, (entry, (ids, prompt_len)) in enumerate(zip(entries, batch)):
        kept = [t for t in masked[row].tolist() if t != IGNORE]
        assert tok.decode(kept) == entry["output"] + "<|endoftext|>"  # exactly the answer and one end-of-text
        assert masked[row, prompt_len - 1] == ids[prompt_len]  # the last prompt position predicts the answer


# -----------------------------------------------------------------------------
# LoRA


def instruct_logits(state, x):
    model = instruct_tiny_gpt()
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x)[0]


def test_instruct_lora_trains_only_the_low_rank_matrices_and_merges_exactly():
    model = instruct_tiny_gpt()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    rank, alpha = 4, 8.0
    add_lora(model, rank, alpha)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    C, L = 32, 2  # per block: c_attn (C -> 3C), attn c_proj (C -> C), c_fc (C -> 4C), mlp c_proj (4C -> C)
    assert trainable == L * rank * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    x = torch.randint(0, EOT, (2, 16))
    model.eval()
    with torch.no_grad():  # B starts at zero: the wrapped model is the pretrained one
        assert torch.equal(model(x)[0], instruct_logits(frozen, x))
    model.train()
    optimizer = configure_optimizer(model, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        _, loss = model(x[:, :-1], x[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(lora) == 4 * L
    assert all(m.B.abs().sum() > 0 for m in lora.values())  # the update really trained
    state = model.state_dict()
    for key, value in frozen.items():  # every pretrained weight, bit for bit
        module, leaf = key.rsplit(".", 1)
        assert torch.equal(state[f"{module}.linear.{leaf}" if module in lora else key], value), key

    model.eval()
    with torch.no_grad():
        unmerged = model(x)[0]
        expected = {f"{n}.weight": m.linear.weight + (m.B @ m.A) * (alpha / rank) for n, m in lora.items()}
        merge_lora(model)
        merged = model(x)[0]
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(frozen)  # a plain GPT again
    for key, weight in expected.items():
        assert torch.equal(model.state_dict()[key], weight), key
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert (merged - instruct_logits(frozen, x)).abs().max() > 1e-3  # and it differs from the start


# -----------------------------------------------------------------------------
# The whole training path: tiny model from scratch, real data, a few steps.

def test_instruct_lora_run_saves_a_plain_checkpoint_plot_and_test_answers(tmp_path, run_main):
    out = tmp_path / "instruct"
    r = run_main("finetune_instruct.py", *INSTRUCT_TINY, "--lora-rank", 4, "--lora-alpha", 8,
                 "--mask-prompt", "--context-length", 128, "--max-iters", 3, "--eval-interval", 2,
                 "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert "935 train, 55 validation, 110 test" in r.stdout
    C, L, V = 64, 2, 50257
    lora = L * 4 * (4 * C + 2 * C + 5 * C + 5 * C)
    total = V * C + 128 * C + L * (12 * C * C + 13 * C) + 2 * C + lora  # 128 positions, and the LoRA matrices
    assert f"trainable parameters: {lora:,} of {total:,}" in r.stdout
    for step in (0, 2, 3):  # at the start, every interval and the last step
        assert f"step {step} (epoch 0.0" in r.stdout and "train loss" in r.stdout
    model = GPT.from_pretrained(str(out / "best.pt"))  # loads like any checkpoint: LoRA is merged away
    assert (model.config.n_layer, model.config.n_embd, model.config.n_ctx) == (2, 64, 128)
    assert torch.load(out / "best.pt", weights_only=True)["step"] in (0, 2, 3)
    assert (out / "loss.png").stat().st_size > 0
    responses = json.loads((out / "responses.json").read_text())
    _, _, test = split(load_entries(INSTRUCT_DATA))
    assert [{k: e[k] for k in ("instruction", "input", "output")} for e in responses] == test
    assert all(isinstance(e["model_response"], str) for e in responses)
    assert not list(out.glob("*.tmp"))


def test_instruct_full_finetuning_lowers_the_loss_and_answers_greedily(tmp_path, run_main):
    out = tmp_path / "full"
    r = run_main("finetune_instruct.py", *INSTRUCT_TINY, "--max-iters", 8, "--eval-interval", 4,
                 "--context-length", 96, "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert "full fine-tuning" in r.stdout and "(100.00%)" in r.stdout
    val = [float(line.split("val loss ")[1].split(" ")[0].rstrip(",")) for line in r.stdout.splitlines()
           if line.startswith("step ")]
    assert len(val) == 3 and val[2] < val[1] < val[0]  # steps 0, 4 and 8
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["step"] == 8 and abs(ckpt["val_loss"] - val[2]) < 1e-3
    # The saved answers (in batches of 4 prompts of different lengths) are each prompt's own greedy
    # continuation by the saved model, cut at end-of-text.
    model, tok = GPT.from_pretrained(str(out / "best.pt")), Tokenizer()
    for entry in json.loads((out / "responses.json").read_text())[:6]:
        prompt = torch.tensor([tok.encode(format_prompt(entry))])
        with torch.no_grad():
            new = []
            for _ in range(3):  # plain argmax over the full sequence, no KV cache, no padding
                next_id = model(torch.cat([prompt, torch.tensor([new], dtype=torch.long)],
                                          dim=1))[0][0, -1].argmax().item()
                if next_id == EOT:
                    break
                new.append(next_id)
        assert entry["model_response"] == tok.decode(new).strip()
    answers = json.loads((out / "responses.json").read_text())
    empty = sum(not entry["model_response"] for entry in answers)
    said = f"{empty} of {len(answers)} answers are empty: the model ends its answers at once; train it longer"
    assert (said in r.stdout) == (empty > 0)


def test_instruct_empty_answers_are_counted_and_said(tmp_path, monkeypatch, run_main):
    import finetune_instruct

    monkeypatch.setattr(finetune_instruct, "answer_all",
                        lambda model, tok, prompts, *a: [""] * (len(prompts) - 1) + ["one"])
    r = run_main("finetune_instruct.py", *INSTRUCT_TINY, "--max-iters", 1, "--context-length", 96,
                 "--out-dir", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "109 of 110 answers are empty: the model ends its answers at once; train it longer (more " \
           "--epochs, a larger model or a higher --lr) before a judge is worth asking" in r.stdout


def test_instruct_bad_input_is_one_clear_line(tmp_path, run_main):
    r = run_main("finetune_instruct.py", *INSTRUCT_TINY, "--out-dir", tmp_path / "x",
                 "--data", "missing.json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "missing.json not found: expected a JSON list of entries with instruction, output" in r.stderr
    torch.save(tiny_model(vocab_size=EOT + 1).checkpoint(), tmp_path / "tiny.pt")  # a window of 64 positions
    r = run_main("finetune_instruct.py", "--init-from", tmp_path / "tiny.pt", "--data", INSTRUCT_DATA,
                 "--out-dir", tmp_path / "x", "--context-length", 128)
    assert r.returncode == 1 and "window of 64 positions: pass --context-length 64 or less" in r.stderr


def test_instruct_malformed_data_names_the_entry(tmp_path, run_main):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c"}]))
    r = run_main("finetune_instruct.py", *INSTRUCT_TINY, "--data", data, "--out-dir", tmp_path / "x")
    assert r.returncode == 1 and "entry 1 needs the string fields instruction, output" in r.stderr


# -----------------------------------------------------------------------------
# The judge, against a fake Ollama server on 127.0.0.1 that speaks /api/chat.


@pytest.fixture
def instruct_ollama(serve):
    return serve(FakeOllama, model="llama3", replies=[], requests=[])


def instruct_responses(tmp_path, n):
    path = tmp_path / "responses.json"
    entries = [{"instruction": f"Say {i}.", "input": "" if i % 2 else "now", "output": f"{i}.",
                "model_response": f"answer {i}"} for i in range(n)]
    path.write_text(json.dumps(entries))
    return path, entries


@pytest.fixture
def instruct_judge(run_main):
    """instruct_judge(responses, server, *flags): finetune_instruct.py --judge against server, in this process."""
    return lambda path, server, *args: run_main("finetune_instruct.py", "--judge", path, "--ollama-url",
                                                server.url, *args)


def test_instruct_judge_scores_each_answer_and_writes_the_mean(tmp_path, instruct_ollama, instruct_judge):
    path, entries = instruct_responses(tmp_path, 3)
    instruct_ollama.replies = ["85", " 40\n", "100."]
    r = instruct_judge(path, instruct_ollama, "--seed", 7)
    assert r.returncode == 0, r.stderr
    assert "entry 0: score 85" in r.stdout and "entry 1: score 40" in r.stdout \
           and "entry 2: score 100" in r.stdout
    assert "mean score 75.00 over 3 entries" in r.stdout
    assert [e["score"] for e in json.loads(path.read_text())] == [85, 40, 100]
    assert len(instruct_ollama.requests) == 3
    for (url_path, body), entry in zip(instruct_ollama.requests, entries):
        assert url_path == "/api/chat"
        assert body["model"] == "llama3" and body["stream"] is False
        assert body["options"] == {"temperature": 0, "seed": 7}
        [message] = body["messages"]
        assert message["role"] == "user"
        for text in (format_prompt(entry), entry["output"], entry["model_response"], "0 to 100"):
            assert text in message["content"]


def test_instruct_judge_retries_a_non_number_then_counts_it_failed_not_zero(tmp_path, instruct_ollama, instruct_judge):
    path, _ = instruct_responses(tmp_path, 2)
    tries = 1 + JUDGE_RETRIES
    instruct_ollama.replies = ["Great answer!"] * tries + ["Score: none", "50"]
    r = instruct_judge(path, instruct_ollama)
    assert r.returncode == 0, r.stderr
    assert f"entry 0: the judge's reply 'Great answer!' is not a score after {tries} tries: " \
           "counted as failed" in r.stdout
    assert "entry 1: score 50" in r.stdout
    assert "mean score 50.00 over 1 entries (1 failed, not counted; they keep their earlier score)" \
           in r.stdout
    assert [e["score"] for e in json.loads(path.read_text())] == [None, 50]
    assert len(instruct_ollama.requests) == tries + 2
    retry = instruct_ollama.requests[1][1]["messages"]  # the retry shows the judge its own reply
    assert [m["role"] for m in retry] == ["user", "assistant", "user"] \
           and retry[1]["content"] == "Great answer!"


def test_instruct_judge_with_no_score_at_all_fails(tmp_path, instruct_ollama, instruct_judge):
    path, _ = instruct_responses(tmp_path, 1)
    before = path.read_bytes()
    instruct_ollama.replies = ["101"] * (1 + JUDGE_RETRIES)  # out of range is not a score either
    line = one_line_error(instruct_judge(path, instruct_ollama))
    assert f"the judge gave no score to any of the 1 entries: {path} is left as it was" in line
    assert path.read_bytes() == before


def test_bad_a_judge_without_scores_never_erases_earlier_ones(tmp_path, instruct_ollama, instruct_judge):
    """Class 4: scores, then a second run whose judge gives none: the file is byte-identical; a run that
    scores some entries keeps the earlier score of each entry it could not score. A run again without
    --rescore asks nothing: every entry has its score."""
    path, _ = instruct_responses(tmp_path, 2)
    instruct_ollama.replies = ["85", "40"]
    assert instruct_judge(path, instruct_ollama).returncode == 0
    scored = path.read_bytes()
    r = instruct_judge(path, instruct_ollama)
    assert r.returncode == 0 and "has a score already" in r.stdout and len(instruct_ollama.requests) == 2
    instruct_ollama.replies = ["no idea"] * 2 * (1 + JUDGE_RETRIES)
    line = one_line_error(instruct_judge(path, instruct_ollama, "--rescore"))
    assert "gave no score to any of the 2 entries" in line and path.read_bytes() == scored
    instruct_ollama.replies = ["90"] + ["no idea"] * (1 + JUDGE_RETRIES)
    assert instruct_judge(path, instruct_ollama, "--rescore").returncode == 0
    assert [e["score"] for e in json.loads(path.read_text())] == [90, 40]


def test_instruct_judge_names_a_missing_model(tmp_path, instruct_ollama, instruct_judge):
    path, _ = instruct_responses(tmp_path, 1)
    r = instruct_judge(path, instruct_ollama, "--judge-model", "nope")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "has no model 'nope' (model 'nope' not found): run `ollama pull nope`" in r.stderr


def test_instruct_judge_says_when_the_server_is_unreachable(tmp_path, run_main):
    path, _ = instruct_responses(tmp_path, 1)
    port = free_port()
    r = run_main("finetune_instruct.py", "--judge", path, "--ollama-url", f"http://127.0.0.1:{port}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"cannot reach Ollama at http://127.0.0.1:{port}: start it with `ollama serve`" in r.stderr


def answering(body, status=200, content_type="application/octet-stream"):
    """A server in Ollama's place that answers every request with body."""
    class Answering(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            reply(self, body, status=status, content_type=content_type)

        def log_message(self, *args):
            pass
    return Answering


def judge_error_leaving_the_file(tmp_path, serve, handler, instruct_judge):
    """The judge's one-line error against handler; the responses file is as it was."""
    path, _ = instruct_responses(tmp_path, 1)
    before = path.read_bytes()
    line = one_line_error(instruct_judge(path, serve(handler)))
    assert path.read_bytes() == before
    return line


def test_bad_judge_reply_without_content(tmp_path, serve, instruct_judge):
    null_content = json.dumps({"message": {"role": "assistant", "content": None}, "done": True})
    line = judge_error_leaving_the_file(tmp_path, serve, answering(null_content.encode()), instruct_judge)
    assert "did not answer with Ollama's chat JSON" in line


def test_bad_judge_html_error_page_is_one_line_of_its_text(tmp_path, serve, instruct_judge):
    # a proxy in front of Ollama, answering with its error page
    page = "<html>\n<head><title>502 Bad Gateway</title></head>\n<body>\n<center>" \
           "<h1>502 Bad Gateway</h1></center>\n<hr><center>nginx</center>\n</body>\n</html>\n" \
           + "<!-- padding -->\n" * 6
    line = judge_error_leaving_the_file(tmp_path, serve, answering(page.encode(), 502, "text/html"),
                                        instruct_judge)
    assert line.endswith("answered HTTP 502: 502 Bad Gateway 502 Bad Gateway nginx") and "<" not in line, line


def test_instruct_resume_after_ctrl_c_is_bitwise_exact(tmp_path, run_main):
    """LoRA, Ctrl-C after the first checkpoint, then --resume: the weights (LoRA's matrices and the
    frozen ones), AdamW's state and the history of a run never stopped, bit for bit; the same answers."""
    args = [*INSTRUCT_TINY, "--lora-rank", 4, "--mask-prompt", "--context-length", 128, "--max-iters", 20,
            "--eval-interval", 5, "--dropout", 0.1]
    a, b, stopped_at, stdout = stop_then_resume("finetune_instruct.py", args, "straight", "stopped", run_main,
                                                cwd=tmp_path)
    assert 1 <= stopped_at < 20 \
           and "python finetune_instruct.py --resume --out-dir stopped continues" in stdout
    assert a["step"] == 20 and any(k.endswith(".A") for k in a["model"])
    assert_bitwise_equal(a, b)
    responses = [json.loads((tmp_path / run / "responses.json").read_text())
                 for run in ("straight", "stopped")]
    assert responses[0] == responses[1]
