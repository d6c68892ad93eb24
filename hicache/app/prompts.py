"""Prompt sets: a hub dataset (DrawBench, PartiPrompts), any local file, an inline list, or the
testbed's held-out captions. Each prompt carries its index and its seed (index + seed_offset), so a
prompt renders the same image whichever shard or run it lands in. An editing prompt also carries the
path of its input image (a source returns ``(instruction, image path)`` pairs for those).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from .errors import SetupError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    index: int
    text: str
    seed: int
    image: str | None = None  # input image of an editing prompt

    @property
    def key(self) -> str:
        """What identifies the prompt's uncached output besides the seed: the text, and the input image if any."""
        return reference_text(self.text, self.image)


def reference_text(text: str, image: str | None) -> str:
    return text if image is None else f"{text}\n[input image {image}]"


def load_prompts(data: DictConfig, seed_offset: int = 0) -> list[Prompt]:
    source = data.source
    if source not in SOURCES:
        raise SetupError(f"data.source={source!r} is unknown; known: {', '.join(sorted(SOURCES))}")
    items = [(t, None) if isinstance(t, str) else tuple(t) for t in SOURCES[source](data)]
    texts = [(t.strip(), image) for t, image in items if t and t.strip()]
    if data.get("limit") is not None:
        texts = texts[: int(data.limit)]
    if not texts:
        raise SetupError(f"data {data.name}: no prompts")
    return [Prompt(i, t, i + int(seed_offset), image) for i, (t, image) in enumerate(texts)]


def _from_list(data: DictConfig) -> list[str]:
    return list(data.prompts)


def read_prompt_file(path: str | Path, column: str | None = None) -> list[str]:
    """One prompt per line for .txt; the ``column`` of a .csv/.tsv/.json/.jsonl/.parquet table."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SetupError(f"prompt file {path} does not exist")
    if path.suffix in ("", ".txt"):
        return path.read_text(encoding="utf-8").splitlines()
    builders = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    if path.suffix not in builders:
        raise SetupError(f"prompt file {path}: unsupported type {path.suffix} (use .txt, .csv, .tsv, .json, .jsonl or .parquet)")
    import datasets

    kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    table = datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train", **kwargs)
    if column not in table.column_names:
        raise SetupError(f"prompt file {path} has no column {column!r} (columns: {', '.join(table.column_names)}); set data.column")
    return list(table[column])


def _from_file(data: DictConfig) -> list[str]:
    if not data.get("file"):
        raise SetupError("data=prompts_file needs data.file=<path to a text file, one prompt per line>")
    return read_prompt_file(data.file, data.get("column"))


def _from_hub(data: DictConfig) -> list[str]:
    """The hub dataset ``data.hub_id``, or ``data.local_file`` (same column) when given."""
    if data.get("local_file"):
        return read_prompt_file(data.local_file, data.column)
    try:
        import datasets
    except ImportError:
        raise SetupError(f"data {data.name} needs the `datasets` package (pip install datasets), "
                         f"or a local copy: data.local_file=<file>") from None
    from datasets.utils import logging as datasets_logging

    verbosity = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity_error()  # its retry messages are not the error
    try:
        table = datasets.load_dataset(data.hub_id, split=data.split)
    except Exception as err:  # datasets raises many types offline; all mean "not reachable, not cached"
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise SetupError(
            f"data {data.name}: cannot load {data.hub_id!r} from the hub ({reason}); save its "
            f"{data.column!r} column to a .txt/.csv file and set data.local_file=<file>"
        ) from None
    finally:
        datasets_logging.set_verbosity(verbosity)
    return list(table[data.column])


def _from_testbed(data: DictConfig) -> list[str]:
    try:
        from hicache.testbeds.flux_shapes import heldout_captions
    except ImportError:
        raise SetupError("data=testbed_heldout needs the testbed package hicache.testbeds.flux_shapes (issue 3) on this checkout") from None
    return list(heldout_captions(int(data.n), int(data.seed)))


def _from_testbed_training(data: DictConfig) -> list[str]:
    """The first ``n`` distinct captions of the testbed's training stream (never a held-out one): for training on
    the testbed's outputs (LESA predictors)."""
    from hicache.testbeds.flux_shapes import ShapesDataset
    from hicache.testbeds.flux_shapes.dataset import is_heldout

    stream, captions, index = ShapesDataset(seed=int(data.seed)), [], 0
    while len(captions) < int(data.n):
        caption = stream.scene(index).caption
        index += 1
        if caption not in captions:
            if is_heldout(caption):  # the stream never yields one; a held-out caption here is a testbed bug
                raise RuntimeError(f"the testbed's training stream yielded the held-out caption {caption!r}")
            captions.append(caption)
    return captions


SOURCES = {"list": _from_list, "file": _from_file, "hub": _from_hub, "testbed": _from_testbed,
           "testbed_training": _from_testbed_training}


def load_input_image(path: str | Path):
    """An editing prompt's input image, as RGB (the file is closed)."""
    from PIL import Image

    path = Path(path).expanduser()
    if not path.is_file():
        raise SetupError(f"input image {path} does not exist")
    with Image.open(path) as image:
        return image.convert("RGB")
