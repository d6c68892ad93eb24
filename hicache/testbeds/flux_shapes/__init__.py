"""A small trained FLUX-architecture testbed shipped in the repo: captioned shapes at 64 px.

    from diffusers import FluxPipeline
    from hicache.testbeds.flux_shapes import TESTBED_DIR, PIPELINE_CALL_KWARGS, check, heldout_captions
    pipe = FluxPipeline.from_pretrained(TESTBED_DIR)
    caption = heldout_captions(1)[0]
    image = pipe(caption, num_inference_steps=50, **PIPELINE_CALL_KWARGS).images[0]
    print(check(image, caption))   # {'shape': True, 'colour': True, ...}

`PIPELINE_CALL_KWARGS` matters: the text encoders were trained on 24-token prompts, and
`FluxPipeline` pads T5 prompts to 512 tokens unless told otherwise.
"""

from pathlib import Path

from .build import MAX_TEXT_TOKENS
from .checker import accuracy, check
from .dataset import RESOLUTION, Scene, ShapesDataset, heldout_captions, heldout_scenes, parse_caption, render
from .. import WEIGHTS_DIR

TESTBED_DIR = WEIGHTS_DIR / "flux_shapes"

PIPELINE_CALL_KWARGS = dict(height=RESOLUTION, width=RESOLUTION, max_sequence_length=MAX_TEXT_TOKENS, guidance_scale=1.0)


def load_pipeline(folder: str | Path = TESTBED_DIR, **kwargs):
    """The shipped testbed as a `FluxPipeline`, or a one-line error saying where it should be."""
    from diffusers import FluxPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"testbed pipeline not found: expected a FluxPipeline folder with model_index.json at {folder} "
            "(train one with `python run.py experiment=testbed_train train.export_dir=<folder>`)"
        )
    return FluxPipeline.from_pretrained(folder, **kwargs)


__all__ = [
    "PIPELINE_CALL_KWARGS",
    "RESOLUTION",
    "Scene",
    "ShapesDataset",
    "TESTBED_DIR",
    "accuracy",
    "check",
    "heldout_captions",
    "heldout_scenes",
    "load_pipeline",
    "parse_caption",
    "render",
]
