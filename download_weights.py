"""Download GPT-2's weights into models/<size>/: OpenAI's checkpoint (its TensorFlow files, converted once
into files that load fast and without TensorFlow), or the Hugging Face Hub's copy (no TensorFlow at all);
or write any model as a Hugging Face folder, or as one GGUF file for llama.cpp and Ollama.

    python download_weights.py --model 124M    # or 355M, 774M, 1558M, gpt2, gpt2-medium, gpt2-large, gpt2-xl
    python download_weights.py --model 124M --source huggingface    # the Hub's model.safetensors
    python download_weights.py --export-hf out/best.pt hf/my-gpt2    # for transformers and the Hub
    python download_weights.py --export-gguf out/best.pt my-gpt2.gguf --gguf-type q8_0   # llama.cpp, Ollama

Each file goes to a temporary .part name, is resumed where an interrupted run left it,
checked against its published size (else the size the server announces) and against what it
must hold (JSON that parses, a safetensors index, TensorFlow's table format, never an HTML page),
and only then renamed into place. Files already complete are checked the same way and skipped, so
running the command again finishes an interrupted download. OpenAI's TensorFlow files are then
converted into config.json and model.safetensors beside them (with vocab.json and merges.txt, the
tokenizer under transformers' names): a Hugging Face GPT-2 folder, which GPT.from_pretrained reads
first. --source huggingface fetches that folder from the Hub itself (HF_ENDPOINT names another
address), through huggingface_hub's cache where huggingface_hub is installed. --export-hf MODEL DIR
and --export-gguf MODEL FILE take any model the scripts load: a size name, a model folder or a .pt.
"""

import errors  # noqa: F401 (imported first: a Ctrl-C during the imports below quits quietly)

import contextlib
import json
import os
import re
import shutil

from cli import add_overwrite_arg, argument_parser
from errors import UserError, run
from fetch import FULL_DISK, download, looks_like_html
from files import check_out_files, replaced, write_json
from gpt2 import ALIASES, GPT, HF_CONFIG, MODEL_SIZES, MODELS_DIR, GPTConfig, read_config, size_name
from loading import load_model, load_tokenizer, model_path

BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"  # + /<size>/<file>
FILES = ["checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
         "model.ckpt.index", "model.ckpt.meta", "vocab.bpe"]
# Published sizes in bytes. A file not listed is checked against the server's Content-Length.
SAME_FOR_ALL = {"encoder.json": 1_042_301, "vocab.bpe": 456_318}  # one tokenizer for every size
PUBLISHED = {
    "124M": {"checkpoint": 77, "hparams.json": 90, "model.ckpt.data-00000-of-00001": 497_759_232,
             "model.ckpt.index": 5_215, "model.ckpt.meta": 471_155},
    "355M": {"checkpoint": 77, "hparams.json": 91, "model.ckpt.data-00000-of-00001": 1_419_292_672,
             "model.ckpt.index": 10_399, "model.ckpt.meta": 926_519},
    "774M": {},
    "1558M": {},
}
HUB = "https://huggingface.co"  # the Hugging Face Hub; HF_ENDPOINT replaces it, as for huggingface_hub
HUB_REPOS = {"124M": "openai-community/gpt2", "355M": "openai-community/gpt2-medium",
             "774M": "openai-community/gpt2-large", "1558M": "openai-community/gpt2-xl"}
# fetched in this order: config.json there = the folder is whole
HUB_FILES = ["vocab.json", "merges.txt", "model.safetensors", "config.json"]
# written in this order: config.json there = the folder is whole
HF_FILES = ["model.safetensors", "config.json"]
# OpenAI's names -> transformers' (same files)
TOKENIZER_FILES = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}
TF_TABLE_MAGIC = (0xdb4775248b80fb57).to_bytes(8, "little")  # how a TensorFlow table (model.ckpt.index) ends
# a full disk, as safetensors ("... No space left on device (os error 28)") and numpy's tofile (a short write,
# without errno) report it
SHORT_WRITE = r"No space left on device|\d+ requested and \d+ written"


def what_is_wrong(path, name=None):
    """None if the file at path can be the release file `name` (OpenAI's or the Hub's), else what it is
    instead. Each is checked by what it must hold, cheaply: files without a published size are known so."""
    from safetensors import SafetensorError, safe_open

    name = name or os.path.basename(path)
    with open(path, "rb") as f:
        head = f.read(1024)
        f.seek(max(os.path.getsize(path) - len(TF_TABLE_MAGIC), 0))
        tail = f.read()
    if looks_like_html(head):
        return "an HTML page (a proxy's, a login or a captive portal's?)"
    try:
        if name in ("hparams.json", "config.json"):
            read_config(path)  # JSON holding GPT-2's sizes
        elif name.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                vocab = json.load(f)
            if not isinstance(vocab, dict) or "<|endoftext|>" not in vocab:
                return "JSON without GPT-2's tokens"
        elif name in ("vocab.bpe", "merges.txt") and not head.startswith(b"#version"):
            return "no BPE merges (they start with '#version')"
        elif name == "checkpoint" and b'model_checkpoint_path: "model.ckpt"' not in head:
            return "no TensorFlow checkpoint list naming model.ckpt"
        elif name.endswith(".index") and tail != TF_TABLE_MAGIC:
            return "no TensorFlow checkpoint index (it does not end as TensorFlow's table format)"
        elif name.endswith(".safetensors"):
            with safe_open(path, "pt"):  # reads the index, checks the length
                pass
    except (ValueError, UnicodeDecodeError, SafetensorError) as e:
        return " ".join(str(e).split())[:200]
    return None


def present(dest, name, size=None):
    """Whether dest is already whole: of its published size where there is one, and what it must be."""
    if not os.path.isfile(dest):
        return False
    got = os.path.getsize(dest)
    wrong = f"{got:,} bytes, expected {size:,}" if size not in (None, got) else what_is_wrong(dest, name)
    if wrong:
        print(f"{dest}: {wrong}: downloading it again")
        return False
    print(f"{dest}: complete, skipped")
    return True


@contextlib.contextmanager
def disk_space(what):
    """Writing `what`: a full disk, or a safetensors file that cannot be written, is one line naming it (the
    files are written under temporary names: what was there before is kept)."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        if getattr(e, "errno", None) in FULL_DISK or re.search(SHORT_WRITE, str(e)):
            raise UserError(f"the disk is full: {what} could not be written (nothing was replaced); "
                            "free some space and run again") from None
        if isinstance(e, SafetensorError):
            raise UserError(f"could not write {what} ({' '.join(str(e).split())[:200]})") from None
        raise


def write_hf(model, folder, tokenizer_from=None):
    """model as a Hugging Face GPT-2 folder: model.safetensors (the names and layout of transformers'
    GPT2LMHeadModel.save_pretrained), config.json, and the tokenizer files when tokenizer_from holds
    OpenAI's. Every file goes to a temporary name, and all are renamed once all are whole."""
    from safetensors.torch import save_file  # needed only here

    # (out, in) -> transformers' (in, out)
    tensors = {name: (p.t() if name.endswith(GPT.CONV1D) else p).contiguous()
               # tied to wte: stored once
               for name, p in model.state_dict().items() if name != "lm_head.weight"}
    copies = {theirs: os.path.join(tokenizer_from, ours) for ours, theirs in TOKENIZER_FILES.items()
              if tokenizer_from and os.path.isfile(os.path.join(tokenizer_from, ours))}
    c = model.config
    eot = min(c.vocab_size, GPTConfig.vocab_size) - 1  # <|endoftext|>, 50256 (in a padded vocabulary too)
    config = {**HF_CONFIG, "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
              "n_positions": c.n_ctx, "n_ctx": c.n_ctx,  # n_ctx: what llama.cpp's converter reads
              "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
              "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
              "bos_token_id": eot, "eos_token_id": eot}
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        # renamed in the reverse order: config.json, which says the folder is whole, last
        with disk_space(folder), contextlib.ExitStack() as stack:
            tmp = {name: stack.enter_context(replaced(os.path.join(folder, name)))
                   for name in ["config.json", *copies, "model.safetensors"]}
            save_file(tensors, tmp["model.safetensors"], metadata={"format": "pt"})
            for name, source in copies.items():
                shutil.copyfile(source, tmp[name])
            write_json(config, tmp["config.json"])
    except BaseException:
        if created and not os.listdir(folder):
            os.rmdir(folder)  # no empty folder left by a failed export
        raise


def converted(folder):
    """Whether folder holds a whole conversion: config.json, and a model.safetensors as long as its index
    says."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.path.join(folder, "model.safetensors"), "pt"):  # reads the index, checks the length
            return os.path.isfile(os.path.join(folder, "config.json"))
    except (OSError, SafetensorError):
        return False


def convert(folder):
    """OpenAI's TensorFlow checkpoint in folder -> a Hugging Face GPT-2 folder's files beside it."""
    # an older or partial conversion: GPT.from_pretrained would read it, not the checkpoint
    for name in HF_FILES:
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    print(f"{folder}: converting the TensorFlow checkpoint to model.safetensors (loads without TensorFlow)")
    write_hf(load_model(folder, reads_text=False), folder, tokenizer_from=folder)


def fetch_openai(size, folder, base_url):
    """OpenAI's seven files into folder, then converted (once) to a Hugging Face folder beside them."""
    sizes = {**SAME_FOR_ALL, **PUBLISHED[size]}
    elsewhere = "; or fetch the same weights from the Hugging Face Hub: --source huggingface"
    fetched = False  # new TensorFlow files: any conversion there is of older ones
    for n, name in enumerate(FILES):
        dest = os.path.join(folder, name)
        if not present(dest, name, sizes.get(name)):
            left = f" ({len(FILES) - n} of the {len(FILES)} files are still to fetch: {', '.join(FILES[n:])})"
            download(f"{base_url.rstrip('/')}/{size}/{name}", dest, size=sizes.get(name),
                     check=lambda path, name=name: what_is_wrong(path, name), elsewhere=left + elsewhere)
            fetched = True
    if fetched or not converted(folder):
        convert(folder)
    else:
        print(f"{folder}: converted already, skipped")


def fetch_hub(size, folder):
    """The Hub's GPT-2 folder (config.json, model.safetensors, the tokenizer) into folder, plus encoder.json
    (its vocab.json under OpenAI's name: the tokenizer read offline). Through huggingface_hub's cache where
    it is installed (a file fetched once is not fetched again), else with our own download."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # not installed: the same files with our own download
        hf_hub_download = None
    endpoint = os.environ.get("HF_ENDPOINT", HUB).rstrip("/")
    for name in HUB_FILES:
        dest = os.path.join(folder, name)
        if present(dest, name):
            continue
        url = f"{endpoint}/{HUB_REPOS[size]}/resolve/main/{name}"
        if hf_hub_download:
            from_hub_cache(hf_hub_download, HUB_REPOS[size], name, endpoint, dest, url)
        else:
            download(url, dest, check=lambda path, name=name: what_is_wrong(path, name),
                     elsewhere="; or fetch OpenAI's files: --source openai")
    encoder = os.path.join(folder, "encoder.json")
    if not present(encoder, "encoder.json"):
        with disk_space(encoder), replaced(encoder) as tmp:
            shutil.copyfile(os.path.join(folder, "vocab.json"), tmp)


def from_hub_cache(hf_hub_download, repo, name, endpoint, dest, url):
    """name of repo through huggingface_hub's cache (resumed, checked against the size the Hub announces),
    checked as what_is_wrong checks a download, then linked (or copied) whole to dest."""
    try:
        cached = hf_hub_download(repo, name, endpoint=endpoint)
    except Exception as e:  # huggingface_hub's HTTP, connection, metadata and size errors, a full disk
        if getattr(e, "errno", None) in FULL_DISK:
            raise UserError(f"the disk is full: huggingface_hub could not write {name} into its cache; free "
                            "some space and run again: the download resumes") from None
        said = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"could not download {url} with huggingface_hub ({type(e).__name__}: {said}); check "
                        "your connection (and HF_ENDPOINT) and run again, or fetch OpenAI's files: "
                        "--source openai") from None
    wrong = what_is_wrong(cached, name)
    if wrong:
        blob = os.path.realpath(cached)
        os.remove(cached)
        if os.path.exists(blob):
            os.remove(blob)  # out of the cache too: the next run fetches it again
        raise UserError(f"{url} sent {wrong}, not the file {name}: not saved")
    with disk_space(dest), replaced(dest) as tmp:
        try:
            os.link(os.path.realpath(cached), tmp)  # the cache's bytes, stored once
        except OSError:  # another file system, or no hard links there
            shutil.copyfile(cached, tmp)


def export_hf(spec, out, overwrite):
    check_out_files([os.path.join(out, name) for name in HF_FILES], overwrite)
    model, source = load_model(spec, reads_text=False), model_path(spec)
    if model.config.positions != "learned":
        raise UserError(f"{spec} has rotary positions, which GPT-2's Hugging Face format cannot hold (it "
                        "learns a vector per position): it runs here, with sample.py")
    if not model.config.tied_head:
        raise UserError(f"{spec} has an output head of its own (train.py --init book), where GPT-2's reuses "
                        "the token embedding: it runs here, with sample.py")
    write_hf(model, out, tokenizer_from=source if os.path.isdir(source) else None)
    print(f"{out}: a Hugging Face GPT-2 folder; "
          f"transformers.GPT2LMHeadModel.from_pretrained({out!r}) loads it")


def export_gguf(spec, out, gguf_type, overwrite):
    try:
        from gguf_export import write_gguf
    except ModuleNotFoundError as e:
        if e.name != "gguf":
            raise
        raise UserError("--export-gguf writes with the gguf package: pip install gguf") from None
    check_out_files([out], overwrite)
    model, tokenizer = load_model(spec), load_tokenizer(spec)  # a vocabulary of GPT-2's tokens
    name = os.path.splitext(os.path.basename(os.path.normpath(spec)))[0]
    with disk_space(out), replaced(out) as tmp:
        write_gguf(model, tokenizer, tmp, gguf_type, name)
    print(f"{out}: a GGUF file ({gguf_type}), its tokenizer inside: llama.cpp runs it (llama-completion "
          f"-m {out} -p TEXT), Ollama from a Modelfile with FROM ./{os.path.basename(out)} "
          "(see docs/weights.md)")


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="124M", choices=[*MODEL_SIZES, *ALIASES], metavar="SIZE",
                        help="124M, 355M, 774M, 1558M or gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    parser.add_argument("--source", default="openai", choices=["openai", "huggingface"],
                        help="openai: OpenAI's TensorFlow files, converted here; huggingface: the Hub's "
                        "model.safetensors (HF_ENDPOINT: another address), no TensorFlow needed")
    parser.add_argument("--models-dir", default=MODELS_DIR, help="the files go to <models-dir>/<size>/")
    parser.add_argument("--base-url", default=BASE_URL,
                        help="--source openai: where the <size>/<file> URLs start")
    parser.add_argument("--export-hf", nargs=2, metavar=("MODEL", "DIR"),
                        help="instead of downloading: write MODEL (a size name, a model folder or a .pt) "
                        "into DIR as a Hugging Face GPT-2 folder")
    parser.add_argument("--export-gguf", nargs=2, metavar=("MODEL", "FILE"),
                        help="instead of downloading: write MODEL (a size name, a model folder or a .pt) "
                        "into FILE as GGUF, for llama.cpp and Ollama, its tokenizer included")
    parser.add_argument("--gguf-type", default="f16", choices=["f32", "f16", "q8_0"],
                        help="--export-gguf's matrices: float32, float16, or 8-bit blocks (Q8_0, a quarter "
                        "of float32's size); vectors stay float32")
    add_overwrite_arg(parser, "--export-hf's DIR or --export-gguf's FILE")
    args = parser.parse_args()

    if args.export_hf:
        return export_hf(*args.export_hf, args.overwrite)
    if args.export_gguf:
        return export_gguf(*args.export_gguf, args.gguf_type, args.overwrite)
    size = size_name(args.model)
    folder = os.path.join(args.models_dir, size)
    files = FILES if args.source == "openai" else HUB_FILES
    try:
        # before any request: a folder that cannot be written is one line (and leftover temporary files go)
        check_out_files([os.path.join(folder, name) for name in files], overwrite=True)
        if args.source == "openai":
            fetch_openai(size, folder, args.base_url)
        else:
            fetch_hub(size, folder)
    except BaseException:
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)  # leave no empty models/<size>/ behind: it would look like a download
        raise
    print(f"GPT-2 {size} is in {folder}; try  python sample.py --model {folder}")


if __name__ == "__main__":
    run(main)
