"""Convert the official Inf-DiT checkpoint to a diffusers folder, or count the released model's parameters.

    python -m hicache.models.inf_dit.convert ckpt/mp_rank_00_model_states.pt out/inf_dit
    python -m hicache.models.inf_dit.convert --count          # no weights needed (meta device)

The output folder holds ``transformer/`` (`save_pretrained`, safetensors; `from_pretrained` loads it)
and ``image_encoder/`` (the OpenCLIP visual tower's safetensors and its architecture name);
`InfDiTPipeline.from_converted(out)` loads both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import (RELEASED_CONFIG, CheckpointMismatch, from_sat_state_dict, load_sat_checkpoint,
                         unused_parameter_count)
from .image_encoder import CLIP_ARCH, official_clip_parameter_count, SAT_PREFIX, build_clip_visual, clip_visual_from_sat_state_dict
from .transformer import InfDiTTransformer2DModel

#: The issue's figures for the official model at the released config.
OFFICIAL_DIT_PARAMS = 753_762_928
OFFICIAL_UNUSED_PARAMS = 332_160


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def released_parameter_counts() -> dict[str, int]:
    """Parameter counts at the released config, built on the meta device (no memory, no weights).

    ``official_unused`` is what the official model holds but never uses: SAT's position table
    (max_sequence_length 256 x hidden) and the per-layer k LayerNorms.
    """
    cfg = RELEASED_CONFIG
    with torch.device("meta"):
        transformer = InfDiTTransformer2DModel(**cfg)
        visual = build_clip_visual(CLIP_ARCH, device="meta")
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    unused = 256 * cfg["hidden_size"] + cfg["num_layers"] * 2 * head_dim
    port = count_parameters(transformer)
    return {"port_transformer": port, "official_unused": unused, "official_dit": port + unused,
            "clip_visual": count_parameters(visual), "official_clip": official_clip_parameter_count(CLIP_ARCH)}


def save_image_encoder(visual: torch.nn.Module, out: Path, arch: str = CLIP_ARCH) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"library": "open_clip", "arch": arch, "part": "visual"}, indent=2))


def load_converted_image_encoder(path: Path, torch_dtype: torch.dtype | None = None) -> torch.nn.Module | None:
    """The visual tower saved by `save_image_encoder`, or None if the folder has none."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        return None
    arch = json.loads((path / "config.json").read_text())["arch"]
    visual = build_clip_visual(arch)
    visual.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return (visual.to(torch_dtype) if torch_dtype is not None else visual).eval()


def convert(ckpt: Path, out: Path, config: dict, with_image_encoder: bool = True) -> InfDiTTransformer2DModel:
    state = load_sat_checkpoint(ckpt)
    transformer = InfDiTTransformer2DModel(**config)
    transformer.load_state_dict(from_sat_state_dict(state, config["num_layers"]), strict=True, assign=True)
    transformer.save_pretrained(out / "transformer", safe_serialization=True)
    n = count_parameters(transformer)
    print(f"transformer: {n:,} parameters -> {out / 'transformer'}")
    dropped = unused_parameter_count(state)
    print(f"dropped unused official parameters: {dropped:,} (official DiT total {n + dropped:,})")
    if with_image_encoder:
        if not any(k.startswith(SAT_PREFIX) for k in state):
            raise CheckpointMismatch(f"{ckpt} has no '{SAT_PREFIX}*' keys (no CLIP tower); pass --no-image-encoder "
                                     "to convert the transformer only")
        visual = clip_visual_from_sat_state_dict(state)
        save_image_encoder(visual, out / "image_encoder")
        print(f"image encoder ({CLIP_ARCH} visual): {count_parameters(visual):,} parameters -> {out / 'image_encoder'}")
    return transformer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hicache.models.inf_dit.convert", description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", nargs="?", help="official mp_rank_00_model_states.pt (or the folder holding it)")
    parser.add_argument("out", nargs="?", help="output folder")
    parser.add_argument("--count", action="store_true", help="print the parameter counts at the released config and exit")
    parser.add_argument("--no-image-encoder", action="store_true", help="convert the transformer only")
    for key, value in RELEASED_CONFIG.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    args = parser.parse_args(argv)

    if args.count:
        c = released_parameter_counts()
        print(f"port transformer (released config): {c['port_transformer']:,} parameters")
        print(f"+ unused in the official model (SAT position table, k LayerNorms): {c['official_unused']:,} "
              f"(issue: {OFFICIAL_UNUSED_PARAMS:,})")
        print(f"= official DiT: {c['official_dit']:,} (issue: {OFFICIAL_DIT_PARAMS:,}) "
              f"{'MATCH' if c['official_dit'] == OFFICIAL_DIT_PARAMS else 'MISMATCH'}")
        print(f"CLIP visual tower ({CLIP_ARCH}), kept: {c['clip_visual']:,} parameters; the official encoder module "
              f"(with the unused token embedding and text projection): {c['official_clip']:,}")
        return 0 if c["official_dit"] == OFFICIAL_DIT_PARAMS and c["official_unused"] == OFFICIAL_UNUSED_PARAMS else 1
    if not args.ckpt or not args.out:
        parser.error("give <ckpt> <out_dir>, or --count")
    config = {key: getattr(args, key) for key in RELEASED_CONFIG}
    try:
        convert(Path(args.ckpt), Path(args.out), config, with_image_encoder=not args.no_image_encoder)
    except (FileNotFoundError, CheckpointMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
