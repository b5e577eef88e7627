"""common.py: what the scripts share."""

import common
from common import openai_tokenizer
from gpt2 import Tokenizer
from tests.conftest import DATA, OPENAI_124M


def test_tokenizer_from_openai_files_equals_tiktoken():
    """The encoding built from encoder.json equals tiktoken's: every token's bytes (the whole rank
    table), the special token, the pre-tokenizer pattern, and the ids of real text."""
    ours, reference = openai_tokenizer(OPENAI_124M), Tokenizer()
    for i in range(reference.enc.n_vocab - 1):
        assert ours.enc.decode_single_token_bytes(i) == reference.enc.decode_single_token_bytes(i), i
    assert ours.enc._special_tokens == reference.enc._special_tokens and ours.enc._pat_str == reference.enc._pat_str
    text = (DATA / "the-verdict.txt").read_text(encoding="utf-8") + " 日本語 🎉 <|endoftext|> naïve\r\n"
    assert ours.encode(text) == reference.encode(text)
    assert ours.eot_id == reference.eot_id == 50256
    assert ours.enc.n_vocab == reference.enc.n_vocab == 50257
    assert ours.decode(ours.encode(text)) == text


def test_plot_of_single_points_is_not_blank(tmp_path):
    import matplotlib.image

    empty = common.plot_curves(str(tmp_path / "empty.png"), "epoch", {"loss": {"train": ([], [])}})
    one = common.plot_curves(str(tmp_path / "one.png"), "epoch", {"loss": {"train": ([1], [0.5]), "val": ([1], [0.7])}})
    a, b = matplotlib.image.imread(empty), matplotlib.image.imread(one)
    assert a.shape == b.shape and (a != b).any(axis=-1).sum() > 20  # the two markers are drawn



