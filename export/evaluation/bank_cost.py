"""What a bank costs to build, and what Ray buys: one run, printed side by side.

    python -m export.evaluation.bank_cost --out runs/default [--images 24] [--classes 4 --per-class 60]
    python -m export.evaluation.bank_cost --models efficientnet --device cuda --images 64 --skip-speedup   # on a GPU

1. Per image, with one torch thread (a Ray shard's setting, so the figures are core-seconds): the
   bank's targeted attack (the L-inf ladder of :func:`export.attacks.art_attacks.attack_into_classes`, a failed
   image tried again at the next budget) and the activation capture, for the pipeline's MNIST CNN
   (``--out``) and for EfficientNet-Lite0 (ImageNet weights, 224 x 224, the ``default`` attack profile,
   on natural photos from scikit-image). From them, the projected time of a 1,000-class bank with 300
   attacked images per class, on one core, on this machine, and the cores that build it in an hour.
   With ``--device cuda`` the same on one GPU (the attack batches all ``--images`` at once), in
   GPU-hours.
2. ``nfp build-bank`` on ``--classes`` classes of the ``--out`` workspace on a local Ray cluster of 1
   and of 2 CPUs (same shards, fresh copies), wall time of each from the first shard sent to the merged
   bank, and the ratio.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES, PER_CLASS = 1000, 300  # the projected bank


def per_image_cost(model, x: np.ndarray, y: np.ndarray, num_classes: int, profile: str, layers=None) -> dict:
    """Seconds per image of the bank's targeted attack into one class and of capture, on the model's
    device (one torch thread on a CPU)."""
    import torch

    from export.models.activations import capture_activations
    from export.attacks.art_attacks import BankAttacks, attack_defaults, attack_into_classes

    torch.set_num_threads(1)
    target = int(np.bincount(y, minlength=num_classes).argmin())  # a class none (or few) of the images has
    keep = y != target
    x, y = x[keep], y[keep]
    attack_into_classes(model, x[:2], y[:2], np.arange(2), num_classes,
                        BankAttacks(attack_defaults(profile), per_class=2, into=[target]),
                        progress=False)  # warm-up (CUDA kernels, allocator)
    start = time.perf_counter()
    results = attack_into_classes(model, x, y, np.arange(len(x)), num_classes,
                                  BankAttacks(attack_defaults(profile), per_class=len(x), into=[target]),
                                  progress=False)
    attack_s = (time.perf_counter() - start) / len(x)
    start = time.perf_counter()
    capture_activations(model, x, layers, batch_size=64, progress=False)
    capture_s = (time.perf_counter() - start) / len(x)
    success = sum(int(r.success.sum()) for r in results) / len(x)
    return {"images": len(x), "attack_s": attack_s, "capture_s": capture_s, "success": success,
            "rungs": len(results)}


def imagenet_photos(count: int) -> np.ndarray:
    """``(count, 3, 224, 224)`` natural photos from scikit-image, cropped and tiled to ``count``."""
    from skimage import data, transform

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.hubble_deep_field()]
    x = np.stack([transform.resize(p, (224, 224), anti_aliasing=True) for p in photos]).astype(np.float32)
    return np.ascontiguousarray(np.resize(x.transpose(0, 3, 1, 2), (count, 3, 224, 224)))


def speedup(out: Path, classes: int, per_class: int) -> dict:
    import ray

    from export.bank.ray_build import RayCluster, build_bank
    from export.data.workspace import Workspace
    from kernels.fingerprint_search import SearchConfig

    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            ws = Path(tmp) / f"w{workers}"
            ws.mkdir()
            for name in ("data.json", "splits.npz", "classifier.pt", "classifier.json", "manifest.json"):
                shutil.copy2(out / name, ws / name)
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
            try:  # timed from the first shard sent to the merged bank: Ray's start (~5 s) is left out
                start = time.perf_counter()
                build_bank(Workspace(ws), per_class, config=SearchConfig(), classes=range(classes),
                           cluster=RayCluster(workers=workers), progress=False)
                times[workers] = time.perf_counter() - start
            finally:
                ray.shutdown()
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/default"), help="a trained pipeline workspace (MNIST CNN)")
    p.add_argument("--models", nargs="+", choices=["mnist", "efficientnet"], default=["mnist", "efficientnet"],
                   help="which models' per-image costs (default: both)")
    p.add_argument("--device", default="cpu", help="torch device of the per-image costs, e.g. cuda (default: cpu)")
    p.add_argument("--images", type=int, default=24, help="images attacked per model (default: %(default)s)")
    p.add_argument("--classes", type=int, default=4, help="classes of the 1-vs-2-worker build (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=60, help="images per class there (default: %(default)s)")
    p.add_argument("--skip-speedup", action="store_true", help="only the per-image costs")
    args = p.parse_args(argv)
    import torch

    rows = {}
    if "mnist" in args.models:
        from export.models.classifier import load_classifier
        from export.data.artifacts import load_prepared
        from export.data.workspace import Workspace

        ws = Workspace(args.out)
        ds, splits, meta = load_prepared(ws)
        rows["MNIST CNN"] = per_image_cost(load_classifier(ws).eval().to(args.device), ds.x[splits.fit[: args.images]],
                                           ds.y[splits.fit[: args.images]], ds.num_classes, meta["dataset"])
    if "efficientnet" in args.models:
        from export.models.efficientnet_lite import efficientnet_lite0

        net = efficientnet_lite0(pretrained=True).eval().to(args.device)
        x = imagenet_photos(args.images)
        with torch.no_grad():
            y = net(torch.from_numpy(x[:5]).to(args.device)).argmax(1).cpu().numpy()
        rows["EfficientNet-Lite0"] = per_image_cost(net, x, np.resize(y, len(x)), 1000, "default")
    gpu = args.device != "cpu"
    unit, workers = ("GPU", 1) if gpu else ("core", os.cpu_count() or 1)
    where = torch.cuda.get_device_name() if gpu else f"one torch thread, {workers}-core machine"
    print(f"per image ({where}); projection: {CLASSES} classes x {PER_CLASS} images")
    print(f"{'model':>20} | {'attack s':>9} {'capture s':>9} {'success':>7} | {'1 ' + unit + ' h':>9} "
          f"{'this machine h':>14} {unit + 's for 1 h':>13}")
    for name, r in rows.items():
        unit_h = CLASSES * PER_CLASS * (r["attack_s"] + r["capture_s"]) / 3600
        print(f"{name:>20} | {r['attack_s']:>9.4f} {r['capture_s']:>9.4f} {r['success']:>7.0%} | {unit_h:>9.1f} "
              f"{unit_h / workers:>14.1f} {int(np.ceil(unit_h)):>13}")
    if not args.skip_speedup:
        t = speedup(args.out, args.classes, args.per_class)
        print(f"nfp build-bank, {args.classes} classes x {args.per_class} images, MNIST CNN: 1 Ray worker {t[1]:.1f} s, "
              f"2 workers {t[2]:.1f} s, speed-up x{t[1] / t[2]:.2f} (Ray's start excluded; the merge and the calibration capture included)")


if __name__ == "__main__":
    main()
