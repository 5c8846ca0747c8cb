"""Feeding 2D training: items per second of one worker process at 256 px, decoded from the files each time (as
before the cache) against read from the decoded-once cache (data/images/cache.py), measured in one run on generated
trees.

    python tests/bench_loader.py                        # 50 Kvasir-sized + 10 ISIC-sized cases, 256 px
    python tests/bench_loader.py --kvasir 200 --isic 20 --rss-cases 2000
    python tests/bench_loader.py --root /tmp/trees      # keep the generated trees (and caches) there

Trees (`folder` layout, in a temporary folder unless --root): --kvasir cases of 622 x 530 and --isic cases of
4000 x 3000, photo-like JPEG images at quality 90 (dataset_trees.textured_rgb: ~85 kB and ~3 MB, as the
owners' files are) with binary masks of their size, JPEG (quality 75) for Kvasir, PNG for ISIC, as theirs.
Rows, per tree, each timed in this process with one thread (a DataLoader worker's setting) over the train
split's cases in a shuffled order, augmented:
    files, full decode   the item as SegmentationFiles.__getitem__ made it before the cache: image and mask decoded
                         in full, resized, augmented, normalised, every time
    files, decode_case   a dataset that no cache is attached to: the same through decode_case (ISIC's drafted)
    cache, float item    dataset[i] from the cache: a row copied from the map, augmented, normalised (validation)
    cache, uint8 item    raw_item(i): train.py's training item, normalised on the device instead
    cache, uint8, loader the same through a DataLoader with 1 worker, batches of 8 (the queue and collation too)
Then the cache: its build (check_cases, the work of a run's first epoch, in BUILD_PROCESSES processes when there
are >= PARALLEL_BUILD cases) and its size; a Kvasir-SEG-sized cache (--rss-cases rows, the Kvasir cases
hard-linked under more names) and the memory of 4 persistent workers reading all of it 3 times (train.py's
loader: EpochOrder / EpochItems, batch 8): each worker's growth of private memory (RssAnon) and of file pages
(RssFile, the cache's, shared with every process mapping it), and the workers' proportional set size (PSS, a
shared page counted once over the processes sharing it). And the draft decoding's error: max / mean |decode_image
- full decode| over the ISIC images and Kvasir images at --size, beside the resize's own spread (bilinear
against bicubic and box of the same full decode) and a draft to S (Image.draft("RGB", (S, S))).
"""
import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from llm4seg import data  # noqa: E402
from dataset_trees import box_mask, textured_rgb, uncached_item  # noqa: E402

SIZES = {"kvasir": (622, 530), "isic": (4000, 3000)}
MASKS = {"kvasir": ".jpg", "isic": ".png"}  # as the owners ship them: Kvasir-SEG's masks are JPEGs, ISIC's PNGs


def write_tree(root: Path, count: int, size: tuple[int, int], mask_suffix: str, seed: int) -> Path:
    """`count` cases of size (W, H) in the folder layout, unless written before."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for i in range(count):
        image, mask = root / "images" / f"case{i:04d}.jpg", root / "masks" / f"case{i:04d}{mask_suffix}"
        if not (image.is_file() and mask.is_file()):
            textured_rgb(*size, rng).save(image, quality=90)
            Image.fromarray(box_mask(size[1], size[0], rng).astype(np.uint8) * 255).save(mask, **(
                {"quality": 75} if mask_suffix == ".jpg" else {}))
    return root


def linked_tree(source: Path, root: Path, count: int) -> Path:
    """`count` cases hard-linked to source's cases in turn: a cache of `count` rows without `count` JPEGs to make."""
    sources = sorted((source / "images").glob("*.jpg"))
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = sources[i % len(sources)]
        for target, origin in ((root / "images" / f"case{i:05d}.jpg", image),
                               (root / "masks" / f"case{i:05d}.jpg", source / "masks" / f"{image.stem}.jpg")):
            if not target.exists():
                os.link(origin, target)
    return root


def items_per_second(read, length: int, seconds: float) -> float:
    """Items read in a shuffled order, whole passes, for at least `seconds` (and one pass)."""
    order, count, start = list(range(length)), 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        random.shuffle(order)
        for index in order:
            read(index)
        count += length
    return count / (time.perf_counter() - start)


def loader_items_per_second(dataset: data.SegmentationFiles, seconds: float) -> float:
    order = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(data.EpochItems(dataset), batch_size=8, sampler=data.EpochOrder(order),
                                         num_workers=1, persistent_workers=True)
    loader.sampler.start(0)
    next(iter(loader))  # the worker started
    count, epoch, start = 0, 1, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        loader.sampler.start(epoch)
        count += sum(len(batch["name"]) for batch in loader)
        epoch += 1
    return count / (time.perf_counter() - start)


def memory_kib(pid: int) -> dict[str, int]:
    """RssAnon, RssFile of /proc/<pid>/status and Pss of smaps_rollup, in KiB."""
    fields = {}
    for name in ("status", "smaps_rollup"):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "Pss"):
                fields[key] = int(value.split()[0])
    return fields


def worker_memory(dataset: data.SegmentationFiles, workers: int, epochs: int) -> tuple[list[dict], float]:
    """Each worker's memory growth (KiB) between its first batch and `epochs` passes over every case; seconds."""
    order = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(data.EpochItems(dataset), batch_size=8, sampler=data.EpochOrder(order),
                                         num_workers=workers, persistent_workers=True)
    loader.sampler.start(0)
    iterator = iter(loader)
    for _ in range(workers):
        next(iterator)  # every worker has started and delivered a batch
    pids = [worker.pid for worker in loader._iterator._workers]
    before = [memory_kib(pid) for pid in pids]
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        loader.sampler.start(epoch)
        for _ in loader:
            pass
    seconds = time.perf_counter() - start
    after = [memory_kib(pid) for pid in pids]
    return [{key: a[key] - b[key] for key in a} for a, b in zip(after, before, strict=True)], seconds


def draft_errors(paths: list[Path], size: int) -> dict[str, tuple[int, float]]:
    """max / mean |x - bilinear of the full decode| over the images, for each x."""
    spread = {"decode_image (draft to >= 2 S where both sides >= 4 S)": [], "draft to S": [],
              "bicubic of the full decode": [], "box of the full decode": []}
    for path in paths:
        full = data.read_rgb(path)
        reference = np.asarray(full.resize((size, size), Image.Resampling.BILINEAR), dtype=np.int16)
        drafted = Image.open(path)
        drafted.draft("RGB", (size, size))
        drafted = data.as_rgb(drafted).resize((size, size), Image.Resampling.BILINEAR)
        for key, pixels in zip(spread, (data.decode_image(path, size)[0], drafted,
                                        full.resize((size, size), Image.Resampling.BICUBIC),
                                        full.resize((size, size), Image.Resampling.BOX)), strict=True):
            spread[key].append(np.abs(np.asarray(pixels, dtype=np.int16) - reference))
    return {key: (int(max(d.max() for d in ds)), float(np.mean([d.mean() for d in ds]))) for key, ds in spread.items()}


def folder_size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kvasir", type=int, default=50, help="Kvasir-sized cases (622 x 530)")
    parser.add_argument("--isic", type=int, default=10, help="ISIC-sized cases (4000 x 3000)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0, help="the least time each row is timed")
    parser.add_argument("--rss-cases", type=int, default=1000, help="rows of the cache 4 workers read (0: skip)")
    parser.add_argument("--root", type=Path, help="where the trees go (kept); default a temporary folder")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers on 2 cores: as asked
    temporary = None if args.root else tempfile.TemporaryDirectory(prefix="bench-loader-")
    root = args.root or Path(temporary.name)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"CPU: {model}, {len(os.sched_getaffinity(0))} cores usable; torch threads 1; {args.size} px; "
          f"cache builds in up to {data.images.cache.BUILD_PROCESSES} processes")

    trees = {}
    for name, count in (("kvasir", args.kvasir), ("isic", args.isic)):
        if count:
            start = time.perf_counter()
            trees[name] = write_tree(root / name, count, SIZES[name], MASKS[name], seed=len(name))
            jpeg_kb = np.mean([p.stat().st_size for p in (trees[name] / "images").glob("*.jpg")]) / 1e3
            print(f"{name}: {count} cases of {SIZES[name][0]} x {SIZES[name][1]} ready in "
                  f"{time.perf_counter() - start:.1f} s, JPEGs of {jpeg_kb:.0f} kB on average")

    print(f"\n{'tree':8} {'path':24} {'items/s':>9} {'ms/item':>8} {'vs full decode':>15}")
    for name, tree in trees.items():
        dataset = data.load_dataset("folder", str(tree), "train", img_size=args.size, seed=0, val_fraction=0.01)
        dataset.epoch = 1
        rows = {"files, full decode": lambda i, dataset=dataset: uncached_item(dataset, i),
                "files, decode_case": dataset.__getitem__}
        rates = {key: items_per_second(read, len(dataset), args.seconds) for key, read in rows.items()}
        start = time.perf_counter()
        data.check_cases(dataset)
        built = time.perf_counter() - start
        cache = dataset.cache.path
        rates["cache, float item"] = items_per_second(dataset.__getitem__, len(dataset), args.seconds)
        rates["cache, uint8 item"] = items_per_second(dataset.raw_item, len(dataset), args.seconds)
        rates["cache, uint8, loader"] = loader_items_per_second(dataset, args.seconds)
        for key, rate in rates.items():
            print(f"{name:8} {key:24} {rate:9.1f} {1e3 / rate:8.2f} {rate / rates['files, full decode']:14.1f}x")
        print(f"{name:8} cache of {len(dataset)} cases: built in {built:.1f} s ({built / len(dataset) * 1e3:.0f} ms "
              f"a case), {folder_size_mb(cache):.1f} MB")

    if args.rss_cases and "kvasir" in trees:
        linked = linked_tree(trees["kvasir"], root / f"kvasir_x{args.rss_cases}", args.rss_cases)
        dataset = data.load_dataset("folder", str(linked), "train", img_size=args.size, seed=0, val_fraction=0.001)
        start = time.perf_counter()
        data.check_cases(dataset)
        built = time.perf_counter() - start
        size = folder_size_mb(dataset.cache.path)
        print(f"\nKvasir-SEG-sized cache: {len(dataset)} cases built in {built:.1f} s, {size:.0f} MB")
        growth, seconds = worker_memory(dataset, workers=4, epochs=3)
        for worker, grown in enumerate(growth):
            print(f"worker {worker}: RssAnon {grown['RssAnon'] / 1024:+.1f} MiB, "
                  f"RssFile {grown['RssFile'] / 1024:+.1f} MiB, PSS {grown['Pss'] / 1024:+.1f} MiB")
        private, proportional = (sum(grown[key] for grown in growth) / 1024 for key in ("RssAnon", "Pss"))
        print(f"4 workers, 3 passes over {len(dataset)} cases in {seconds:.1f} s: private memory {private:+.1f} MiB, "
              f"PSS {proportional:+.1f} MiB in all, against a cache of {size / 1.048576:.0f} MiB (a copy per worker "
              f"would be {4 * size / 1.048576:.0f} MiB)")

    for name, tree in trees.items():
        errors = draft_errors(sorted((tree / "images").glob("*.jpg")), args.size)
        print(f"\n{name}: |x - bilinear of the full decode| at {args.size} px, grey levels (max / mean)")
        for key, (largest, mean) in errors.items():
            print(f"  {key:56} {largest:3d} / {mean:.3f}")
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    main()
