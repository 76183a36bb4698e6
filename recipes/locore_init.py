"""Initialise a LoCoRE model from a local pre-trained language model, as the supplementary describes.

    python recipes/locore_init.py locore-base  --source PATH/longformer-base-4096 --out checkpoints/locore-base-init
    python recipes/locore_init.py locore-small --source PATH/longformer-base-4096 --out checkpoints/locore-small-init
    python recipes/locore_init.py locore-tiny  --source PATH/roberta-tiny-cased  --out checkpoints/locore-tiny-init

base: the Longformer with its 4,096 positions extended to 5,120 (linear interpolation, or
``--positions tile`` as allenai's conversion notebook); small: its first 6 layers; tiny: a RoBERTa
migrated into Longformer (local q/k/v copied into the global ones), positions extended by tiling.
The output folder loads with ``create_reranker(variant, checkpoint=OUT)`` and is the starting
point for training. Nothing is downloaded: ``--source`` is a local Hugging Face model folder.
"""
from __future__ import annotations

import argparse

from locore_plugin.adapters.locore import (
    CONFIGS,
    INIT_RECIPES,
    MAX_POSITIONS,
    POSITION_METHODS,
    init_from_language_model,
    save_checkpoint,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=sorted(INIT_RECIPES))
    parser.add_argument("--source", required=True, help="local HF RoBERTa / Longformer folder (config.json + weights)")
    parser.add_argument("--out", required=True, help="output folder (model.safetensors + config.json)")
    parser.add_argument("--positions", choices=POSITION_METHODS, help="position extension (default: the variant's recipe)")
    parser.add_argument("--num-layers", type=int, help="layers kept (default: the variant's recipe)")
    parser.add_argument("--max-positions", type=int, default=MAX_POSITIONS, help="position rows (5,120 context + 2)")
    parser.add_argument("--local-dim", type=int, default=768, help="local descriptor dimension (DINOv2: 768, CVNet: 1024)")
    parser.add_argument("--global-dim", type=int, default=768, help="global descriptor dimension (DINOv2: 768, CVNet: 2048)")
    parser.add_argument("--attention-window", type=int, help="attention window (default: the variant's, Table A)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomly initialised head and projections")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    overrides = dict(max_position_embeddings=args.max_positions, local_dim=args.local_dim, global_dim=args.global_dim)
    if args.attention_window:
        overrides["attention_window"] = args.attention_window
    model = init_from_language_model(args.source, args.variant, positions=args.positions, num_layers=args.num_layers,
                                     seed=args.seed, **overrides)
    save_checkpoint(model, args.out, args.variant)
    table = CONFIGS[args.variant]
    arch = {k: getattr(model.config, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")}
    note = "" if all(arch[k] == table[k] for k in arch) else f" (Table A {args.variant}: {table})"
    print(f"{args.variant}: {sum(p.numel() for p in model.parameters()):,} parameters, {arch}{note} -> {args.out}")


if __name__ == "__main__":
    main()
