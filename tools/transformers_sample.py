"""The peer of `python sample.py --max-new-tokens 1` in the start-up comparison of docs/bench.md: the same
work in transformers, from the same Hugging Face folder (its tokenizer files beside the weights).

    python -m tools.transformers_sample --model hf
"""

import torch
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from cli import argument_parser


def main():
    p = argument_parser(__doc__)
    p.add_argument("--model", required=True, help="a Hugging Face GPT-2 folder with its tokenizer files")
    p.add_argument("--prompt", default="Every effort moves you", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=1, help="tokens to sample")
    args = p.parse_args()
    tok = GPT2TokenizerFast.from_pretrained(args.model)
    model = GPT2LMHeadModel.from_pretrained(args.model).eval()
    ids = tok(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=True, top_k=50,
                             pad_token_id=tok.eos_token_id)
    print(tok.decode(out[0]))


if __name__ == "__main__":
    main()
