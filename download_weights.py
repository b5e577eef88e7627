"""Download OpenAI's GPT-2 checkpoint (its TensorFlow files) into models/<size>/ and convert it,
once, into files that load fast and without TensorFlow; or write any model as a Hugging Face folder.

    python download_weights.py --model 124M    # or 355M, 774M, 1558M, gpt2, gpt2-medium, gpt2-large, gpt2-xl
    python download_weights.py --export-hf out/best.pt hf/my-gpt2    # for transformers, the Hub, llama.cpp

Each file goes to a temporary .part name, is resumed where an interrupted run left it,
checked against its published size and only then renamed into place. Files already
complete are skipped, so running the command again finishes an interrupted download.
The TensorFlow files are then converted into config.json and model.safetensors beside
them (with vocab.json and merges.txt, the tokenizer under transformers' names): a Hugging
Face GPT-2 folder, which GPT.from_pretrained reads first. --export-hf MODEL DIR writes the
same files into DIR for any model the scripts load: a size name, a model folder or a .pt.
"""

import os
import shutil

from cli import add_overwrite_arg, argument_parser
from errors import UserError, run
from fetch import download
from files import check_out_files, replaced, write_json
from gpt2 import GPT, HF_CONFIG, MODELS_DIR, GPTConfig, size_name
from loading import load_model, model_path

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
# written in this order: config.json there = the folder is whole
HF_FILES = ["model.safetensors", "config.json"]
# OpenAI's names -> transformers' (same files)
TOKENIZER_FILES = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}


def write_hf(model, folder, tokenizer_from=None):
    """model as a Hugging Face GPT-2 folder: model.safetensors (the names and layout of transformers'
    GPT2LMHeadModel.save_pretrained), config.json, and the tokenizer files when tokenizer_from holds
    OpenAI's. Each file goes to a temporary name and is renamed when whole."""
    from safetensors.torch import save_file  # needed only here

    os.makedirs(folder, exist_ok=True)
    # (out, in) -> transformers' (in, out)
    tensors = {name: (p.t() if name.endswith(GPT.CONV1D) else p).contiguous()
               # tied to wte: stored once
               for name, p in model.state_dict().items() if name != "lm_head.weight"}
    path = os.path.join(folder, "model.safetensors")
    with replaced(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    for ours, theirs in TOKENIZER_FILES.items():
        if tokenizer_from and os.path.isfile(os.path.join(tokenizer_from, ours)):
            with replaced(os.path.join(folder, theirs)) as tmp:
                shutil.copyfile(os.path.join(tokenizer_from, ours), tmp)
    c = model.config
    eot = min(c.vocab_size, GPTConfig.vocab_size) - 1  # <|endoftext|>, 50256 (in a padded vocabulary too)
    write_json({**HF_CONFIG, "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
                "n_positions": c.n_ctx, "n_ctx": c.n_ctx,  # n_ctx: what llama.cpp's converter reads
                "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
                "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
                "bos_token_id": eot, "eos_token_id": eot},
               os.path.join(folder, "config.json"))


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


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="124M",
                        help="124M, 355M, 774M, 1558M or gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    parser.add_argument("--models-dir", default=MODELS_DIR, help="the files go to <models-dir>/<size>/")
    parser.add_argument("--base-url", default=BASE_URL, help="where the <size>/<file> URLs start")
    parser.add_argument("--export-hf", nargs=2, metavar=("MODEL", "DIR"),
                        help="instead of downloading: write MODEL (a size name, a model folder or a .pt) "
                        "into DIR as a Hugging Face GPT-2 folder")
    add_overwrite_arg(parser, "--export-hf's DIR")
    args = parser.parse_args()

    if args.export_hf:
        spec, out = args.export_hf
        check_out_files([os.path.join(out, name) for name in HF_FILES], args.overwrite)
        source = model_path(spec)
        write_hf(load_model(spec, reads_text=False), out,
                 tokenizer_from=source if os.path.isdir(source) else None)
        print(f"{out}: a Hugging Face GPT-2 folder; "
              f"transformers.GPT2LMHeadModel.from_pretrained({out!r}) loads it")
        return
    try:
        size = size_name(args.model)
    except ValueError as e:
        raise UserError(str(e)) from None
    folder = os.path.join(args.models_dir, size)
    sizes = {**SAME_FOR_ALL, **PUBLISHED[size]}
    fetched = False  # new TensorFlow files: any conversion there is of older ones
    for name in FILES:
        dest, expected = os.path.join(folder, name), sizes.get(name)
        if os.path.isfile(dest):
            if expected is None or os.path.getsize(dest) == expected:
                print(f"{dest}: complete, skipped")
                continue
            print(f"{dest}: {os.path.getsize(dest):,} bytes, expected {expected:,}: downloading it again")
        try:
            download(f"{args.base_url.rstrip('/')}/{size}/{name}", dest, size=expected)
            fetched = True
        except BaseException:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)  # leave no empty models/<size>/ behind: it would look like a download
            raise
    if fetched or not converted(folder):
        convert(folder)
    else:
        print(f"{folder}: converted already, skipped")
    print(f"GPT-2 {size} is in {folder}; try  python sample.py --model {folder}")


if __name__ == "__main__":
    run(main)
