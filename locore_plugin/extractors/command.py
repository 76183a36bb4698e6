"""``locore-plugin extract``: descriptor files in the official layout from a folder of images."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from locore_plugin.options import parse_assignment

from .base import ImageExtractor, create_extractor
from .images import BBox

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def extract_split(extractor: ImageExtractor, images: Sequence, directory, desc: str, split: str,
                  bboxes: Optional[Sequence[Optional[BBox]]] = None, chunk_size: int = 64,
                  verbose: bool = True) -> tuple[Path, Path]:
    """Extract ``images`` and write ``{desc}_{split}_local.hdf5`` / ``{desc}_{split}_global.pt``
    (official layout, ``extractor.num_locals`` rows per image) with
    :class:`~locore_plugin.io.descriptors.DescriptorWriter`.

    Images go through the extractor's cache in chunks, so with an on-disk cache an interrupted run
    resumes where it stopped; the files appear only once complete.
    """
    from locore_plugin.io.descriptors import DescriptorWriter
    from locore_plugin.progress import progress

    if not images:
        raise ValueError(f"no images for the {split} split")
    if bboxes is not None and len(bboxes) != len(images):
        raise ValueError(f"{len(images)} images but {len(bboxes)} bounding boxes")
    chunks = range(0, len(images), chunk_size)
    bar = progress(total=len(images), desc=f"{desc} {split}", unit="image", disable=not verbose)

    def chunk(start):
        features = extractor.extract_many(images[start : start + chunk_size],
                                          None if bboxes is None else bboxes[start : start + chunk_size])
        bar.update(len(features))
        return features

    first = chunk(0)
    local_dim = None if first[0].local is None else first[0].local.shape[1]
    global_dim = None if first[0].global_desc is None else first[0].global_desc.shape[0]
    with bar, DescriptorWriter(directory, desc, split, len(images), max(extractor.num_locals, 1),
                               local_dim, global_dim) as writer:
        writer.append(first)
        for start in chunks[1:]:
            writer.append(chunk(start))
    return writer.local_path, writer.global_path


def _image_folder(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def _revisited_splits(folder: Path, gnd_path: Path) -> dict[str, tuple[list[Path], Optional[list]]]:
    """Query (cropped to the ground-truth ``bbx``) and gallery images of a revisited dataset."""
    from locore_plugin.io.pickles import read_pickle

    info = read_pickle(gnd_path)
    if not isinstance(info, dict) or not {"imlist", "qimlist", "gnd"} <= set(info):
        raise ValueError(f"{gnd_path}: expected a dict with imlist, qimlist and gnd")
    if len(info["gnd"]) != len(info["qimlist"]):
        raise ValueError(f"{gnd_path}: {len(info['qimlist'])} queries but {len(info['gnd'])} ground-truth entries")

    def paths(names):
        out = [folder / (n if Path(n).suffix.lower() in IMAGE_SUFFIXES else f"{n}.jpg") for n in names]
        missing = [str(p) for p in out if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images of {gnd_path.name} missing in {folder}, e.g. {missing[0]}")
        return out

    return {"query": (paths(info["qimlist"]), [g["bbx"] for g in info["gnd"]]),
            "gallery": (paths(info["imlist"]), None)}


def _benchmark_splits(folder: Path, benchmark: str) -> dict[str, tuple[list[Path], None]]:
    """Every split of a category benchmark (SOP, In-shop, CUB-200) as its split files list it."""
    from locore_plugin.data.categories import CATEGORY_DATASETS

    if benchmark not in CATEGORY_DATASETS:
        raise SystemExit(f"unknown benchmark {benchmark!r}; expected one of {sorted(CATEGORY_DATASETS)}")
    splits = CATEGORY_DATASETS[benchmark].read(folder)
    out = {}
    for split, images in splits.items():
        paths = [folder / path for path in images.paths]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images of the {split} split missing in {folder}, e.g. {missing[0]}")
        out[split] = (paths, None)
    return out


def add_extract_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "extract",
        help="write descriptor files (official AMES/LoCoRE layout) for a folder of images or a revisited dataset",
        description="Writes {desc}_{split}_local.hdf5 and {desc}_{split}_global.pt into --out. A folder gives the "
        "gallery split (row order in {desc}_gallery_images.txt); with --gnd (gnd_<dataset>.pkl) the query split "
        "(images cropped to the ground-truth bbx) and the gallery split; with --benchmark (sop, inshop, cub200; "
        "--images is the dataset folder holding its split files) every split it lists, in its order. Interrupted "
        "runs resume from the "
        "per-image cache; finished splits are skipped unless --overwrite.",
    )
    parser.add_argument("extractor", help="registered extractor name, e.g. sift or dinov2-ames (an unknown name lists them)")
    parser.add_argument("--images", required=True, type=Path, help="folder of images (for --gnd: <name>.jpg files)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (a dataset folder of the data root)")
    parser.add_argument("--gnd", type=Path, help="gnd_<dataset>.pkl: extract its query and gallery images")
    parser.add_argument("--benchmark", help="a category benchmark whose split files --images holds: sop (Ebay_*.txt), "
                        "inshop (list_eval_partition.txt) or cub200 (images.txt, image_class_labels.txt)")
    parser.add_argument("--desc", help="descriptor name in the file names (default: the extractor name)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="extractor option (repeatable), e.g. num_locals=100; VALUE: a TOML or Python literal, or plain text")
    parser.add_argument("--cache-dir", type=Path, help="per-image cache for resuming (default: OUT/.extract-cache)")
    parser.add_argument("--keep-cache", action="store_true", help="keep the per-image cache after success")
    parser.add_argument("--overwrite", action="store_true", help="re-write splits whose files exist")
    parser.add_argument("--chunk-size", type=int, default=64, help="images per write")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args):
        import shutil

        options = dict(_option(text) for text in args.option)
        cache_dir = args.cache_dir or args.out / ".extract-cache"
        extractor = create_extractor(args.extractor, cache_dir=cache_dir, cache_size=0, **options)
        desc = args.desc or args.extractor
        if args.gnd is not None and args.benchmark is not None:
            raise SystemExit("--gnd and --benchmark name two layouts: give one")
        if args.gnd is not None:
            splits = _revisited_splits(args.images, args.gnd)
        elif args.benchmark is not None:
            splits = _benchmark_splits(args.images, args.benchmark)
        else:
            files = _image_folder(args.images)
            splits = {"gallery": (files, None)}
        args.out.mkdir(parents=True, exist_ok=True)
        for split, (images, bboxes) in splits.items():
            local_path, global_path = (args.out / f"{desc}_{split}_local.hdf5", args.out / f"{desc}_{split}_global.pt")
            if local_path.is_file() and global_path.is_file() and not args.overwrite:
                print(f"{local_path.name} and {global_path.name} exist: skipped (--overwrite to redo)")
                continue
            extract_split(extractor, images, args.out, desc, split, bboxes, args.chunk_size, not args.quiet)
            if args.gnd is None and args.benchmark is None:
                names = "".join(f"{p.relative_to(args.images)}\n" for p in images)
                (args.out / f"{desc}_{split}_images.txt").write_text(names)
            print(f"wrote {local_path} and {global_path} ({len(images)} images)")
        if not args.keep_cache:
            shutil.rmtree(cache_dir / extractor.identity, ignore_errors=True)
            if cache_dir.is_dir() and not any(cache_dir.iterdir()):
                cache_dir.rmdir()
        return 0

    parser.set_defaults(run=run)


def _option(text: str) -> tuple[str, Any]:
    try:
        return parse_assignment(text, "--option")
    except ValueError as error:
        raise SystemExit(str(error)) from None
