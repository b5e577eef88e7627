"""Download OpenAI's GPT-2 checkpoint (its TensorFlow files) into models/<size>/.

    python download_weights.py --model 124M    # or 355M, 774M, 1558M, gpt2, gpt2-medium, gpt2-large, gpt2-xl

Each file goes to a temporary .part name, is resumed where an interrupted run left it,
checked against its published size and only then renamed into place. Files already
complete are skipped, so running the command again finishes an interrupted download.
"""

import os

from common import MODELS_DIR, argument_parser, download, run
from gpt2 import size_name

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


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="124M", help="124M, 355M, 774M, 1558M or gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    parser.add_argument("--models-dir", default=MODELS_DIR, help="the files go to <models-dir>/<size>/")
    parser.add_argument("--base-url", default=BASE_URL, help="where the <size>/<file> URLs start")
    args = parser.parse_args()

    size = size_name(args.model)
    folder = os.path.join(args.models_dir, size)
    sizes = {**SAME_FOR_ALL, **PUBLISHED[size]}
    for name in FILES:
        dest, expected = os.path.join(folder, name), sizes.get(name)
        if os.path.isfile(dest):
            if expected is None or os.path.getsize(dest) == expected:
                print(f"{dest}: complete, skipped")
                continue
            print(f"{dest}: {os.path.getsize(dest):,} bytes, expected {expected:,}: downloading it again")
        try:
            download(f"{args.base_url.rstrip('/')}/{size}/{name}", dest, size=expected)
        except BaseException:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)  # leave no empty models/<size>/ behind: it would look like a download
            raise
    print(f"GPT-2 {size} is in {folder}; try  python sample.py --model {folder}")


if __name__ == "__main__":
    run(main)
