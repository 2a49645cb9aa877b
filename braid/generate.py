"""Text generation: ``python -m braid.generate --model <path> --prompt "..." --max-new-tokens N``.

``--model`` is anything :func:`braid.convert.load` reads (a run's checkpoint, ``latest``, an exported
or a stock Hugging Face directory). Greedy by default; ``--temperature > 0`` samples (with optional
``--top-k`` / ``--top-p``). Decoding is incremental (braid.models.decoding); ``--no-cache`` runs a
full forward per token instead, the reference it must equal.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from braid.errors import BraidError
from braid.models.decoding import DecodeCache, decode_step, supports_incremental


def _pick(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
          generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits ``[B, V]`` → next ids ``[B]``: argmax when temperature is 0, else a sample."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = None,
             use_cache: bool = True, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Continue ``input_ids [B, T]`` (int64) by up to ``max_new_tokens``; returns ``[B, T + n]``.

    Rows stop together: generation ends once every row has produced ``eos_id`` (rows that finished
    earlier keep receiving tokens, which callers cut at their first eos).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"generate: input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}")
    model.eval()
    ids = input_ids
    use_cache = use_cache and supports_incremental(model)
    cache = DecodeCache()
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new = ids
    for _ in range(max_new_tokens):
        logits = decode_step(model, new, cache)[:, -1] if use_cache else model(ids)[:, -1]
        nxt = _pick(logits, temperature, top_k, top_p, generator)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        new = nxt[:, None]
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
    return ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m braid.generate", description=__doc__)
    parser.add_argument("--model", required=True, help="checkpoint dir (or latest), or a Hugging Face dir")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="full forward per token (slow reference)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        print("braid: error: --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1) or \
            (args.top_k is not None and args.top_k < 1):
        print("braid: error: --temperature must be >= 0, --top-p in (0, 1], --top-k >= 1", file=sys.stderr)
        return 2
    try:
        from braid.convert import load
        from braid.data.tokenizer import load_tokenizer

        loaded = load(args.model)
        tok = load_tokenizer(loaded.tokenizer)
    except (BraidError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"braid: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    prompt = torch.as_tensor(tok.encode_batch([args.prompt])[0], dtype=torch.int64)[None]
    if prompt.shape[1] == 0:
        prompt = torch.tensor([[tok.eos_id]])  # an empty prompt starts a new document
    gen = torch.Generator().manual_seed(args.seed)
    out = generate(loaded.model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, eos_id=tok.eos_id, use_cache=not args.no_cache, generator=gen)
    new = out[0, prompt.shape[1]:].tolist()
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    print(args.prompt + tok.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
