"""Scaling on paper: gradient volume, all-reduce time, S3 feed rate and the largest efficient data-parallel size.

Prints every figure of docs/scaling.md as Markdown tables, with the inputs it assumed. Nothing here is measured on a
GPU: parameter counts come from the models taxonet trains (random init, no download), JPEG sizes from images encoded
here, per-GPU speed from the raw-PyTorch anchors of one H100 (shared/ENVIRONMENT.md), and link speeds from the
assumptions given on the command line (defaults below, printed with the tables).

Model of one data-parallel step (DDP, one process per GPU):

* gradient bytes S = 4 × trainable parameters (fp32 gradients under bf16 autocast; 2 × with DDP's bf16 compression
  hook), all-reduced in buckets of 25 MB (DDP's default ``bucket_cap_mb``);
* ring all-reduce of S over n ranks: ``2 (n-1)/n × S / busbw + 2 (n-1) × alpha`` per bucket (NCCL's bus-bandwidth
  convention; the ring is the conservative choice — NCCL's trees cut the latency term at scale);
* nodes of g GPUs: NVLink inside a node, one NIC per node between nodes; the inter-node phase moves
  ``2 (N-1)/N × S`` through each node's NIC (N nodes) and is the slower phase, so it sets the time;
* compute per step from the anchor: ``batch / anchor img/s``; the backward pass is 2/3 of it and DDP overlaps a bucket's
  all-reduce with the rest of the backward pass; only a fraction ``--overlap`` of the backward time is counted as
  hiding communication (kernels compete for SMs and memory bandwidth), and the last bucket (the first layers'
  gradients, ready last) is never hidden;
* efficiency = compute / (compute + exposed communication); "efficient" = at least ``--target`` (default 0.90), and
  the node's NIC carries its S3 reads plus its gradient traffic within ``--nic-budget`` of its effective rate.

Usage: python tests/bench/scaling_model.py [--nvlink-gbs 450] [--eth-efficiency 0.7] [--overlap 0.5] ...
"""

from __future__ import annotations

import argparse
import io
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))

from taxonet.models.backbones import build_backbone  # noqa: E402
from taxonet.models.heads import HierarchicalClassifier  # noqa: E402
from taxonet.taxonomy import Taxonomy  # noqa: E402

BUCKET_BYTES = 25 * 2**20  # DDP bucket_cap_mb default
GB = 1e9

#: raw-PyTorch train-step anchors, one H100 SXM, bf16 autocast, channels_last, 3 rank heads (ENVIRONMENT.md)
ANCHORS = (
    # label, backbone, input px, batch per GPU, train img/s
    ("ResNet50-MTL 224 px", "resnet50", 224, 256, 3773.0),
    ("ResNet50-MTL 128 px", "resnet50", 128, 512, 11575.0),
    ("EfficientNet-B3-MTL 300 px", "efficientnet_b3", 300, 256, 1348.0),
)
#: JPEG decode + resize of 256 px crops on the H100 box (ENVIRONMENT.md): PIL with draft mode in 16 processes, and
#: nvjpeg on the GPU (torchvision.io.decode_jpeg, batch 128)
PIL_16_PROCESSES_IMG_S = 7877.0
NVJPEG_IMG_S = 16632.0
#: a realistic monitoring taxonomy (assumed: a national insect survey) next to the 4/5/9 demo tree
REALISTIC_HEADS = {"order": 12, "family": 150, "species": 1000}


# ------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class ModelSize:
    backbone: str
    taxonomy: str
    backbone_params: int
    head_params: int
    buffers: int  # batch-norm running statistics: DDP broadcasts them from rank 0 every forward pass

    @property
    def params(self) -> int:
        return self.backbone_params + self.head_params

    def gradient_bytes(self, bytes_per_value: int = 4) -> int:
        return self.params * bytes_per_value


def count(backbone: str, heads: dict[str, int], taxonomy: str) -> ModelSize:
    module, dim = build_backbone(backbone, None)  # random init: no download
    model = HierarchicalClassifier(module, dim, heads)  # hidden 512, as the packaged configs
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone_params = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    buffers = sum(b.numel() for name, b in model.named_buffers() if not name.endswith("num_batches_tracked"))
    return ModelSize(backbone, taxonomy, backbone_params, trainable - backbone_params, buffers)


def sample_photos() -> list[tuple[str, np.ndarray]]:
    """Real photographs shipped inside installed packages (matplotlib is a runtime dependency; scikit-learn a dev
    one), as RGB arrays; empty if neither is installed."""
    photos = []
    try:
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data("grace_hopper.jpg") as handle:
            photos.append(("matplotlib grace_hopper.jpg", np.asarray(Image.open(handle).convert("RGB"))))
    except Exception:  # not installed or sample data stripped
        pass
    try:
        from sklearn.datasets import load_sample_image

        for name in ("china.jpg", "flower.jpg"):
            photos.append((f"scikit-learn {name}", load_sample_image(name)))
    except Exception:
        pass
    return photos


def jpeg_sizes(sides: list[int], quality: int, samples: int) -> dict[str, dict[int, float]]:
    """Mean bytes per JPEG crop at each side: the synthetic insects taxonet renders, and random square crops of real
    photographs (natural texture compresses worse than rendered shapes)."""
    from PIL import Image

    from taxonet.data.synthetic import SyntheticInsects

    def encode(image: Image.Image) -> int:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        return len(buffer.getvalue())

    sizes: dict[str, dict[int, float]] = {"synthetic insects (taxonet.data.synthetic)": {}}
    taxonomy = Taxonomy.demo()
    for side in sides:
        generator = SyntheticInsects(taxonomy, image_size=min(side, 512), seed=0)
        chains = generator.chains
        sizes["synthetic insects (taxonet.data.synthetic)"][side] = statistics.mean(
            encode(generator.render(chains[i % len(chains)], i)) for i in range(samples))
    photos = sample_photos()
    if photos:
        label = "crops of real photos (" + ", ".join(name for name, _ in photos) + ")"
        sizes[label] = {}
        rng = np.random.default_rng(0)
        for side in sides:
            values = []
            for i in range(samples):
                _, array = photos[i % len(photos)]
                height, width = array.shape[:2]
                crop = int(rng.integers(min(height, width) // 2, min(height, width) + 1))
                top, left = int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))
                image = Image.fromarray(array[top:top + crop, left:left + crop]).resize((side, side), Image.BILINEAR)
                values.append(encode(image))
            sizes[label][side] = statistics.mean(values)
    return sizes


# ------------------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class Fabric:
    name: str
    gpus_per_node: int
    intra_gbs: float  # NVLink busbw inside a node (GB/s); unused with one GPU per node
    inter_gbs: float  # effective NIC rate between nodes (GB/s); inf when everything is inside one node
    intra_alpha_s: float
    inter_alpha_s: float
    max_gpus: int  # 8 for "one node", else unbounded


def ring_time(size_bytes: float, ranks: int, busbw_gbs: float, alpha_s: float) -> float:
    if ranks <= 1:
        return 0.0
    buckets = max(1, math.ceil(size_bytes / BUCKET_BYTES))
    return 2 * (ranks - 1) / ranks * size_bytes / (busbw_gbs * GB) + buckets * 2 * (ranks - 1) * alpha_s


def allreduce_time(size_bytes: float, gpus: int, fabric: Fabric) -> float:
    """Seconds per step to all-reduce ``size_bytes`` over ``gpus`` GPUs: NVLink inside nodes, the NIC between."""
    per_node = min(gpus, fabric.gpus_per_node)
    nodes = math.ceil(gpus / fabric.gpus_per_node)
    intra = ring_time(size_bytes, per_node, fabric.intra_gbs, fabric.intra_alpha_s) if per_node > 1 else 0.0
    inter = ring_time(size_bytes, nodes, fabric.inter_gbs, fabric.inter_alpha_s) if nodes > 1 else 0.0
    return max(intra, inter) if nodes > 1 else intra  # NCCL pipelines the two phases: the slower one bounds it


def last_bucket_time(size_bytes: float, gpus: int, fabric: Fabric) -> float:
    return allreduce_time(min(size_bytes, BUCKET_BYTES), gpus, fabric)


@dataclass(frozen=True)
class StepModel:
    compute_s: float
    comm_s: float
    exposed_s: float
    efficiency: float
    nic_gbs: float  # bytes through each node's NIC per second (S3 reads + gradients), GB/s


def step(gradient_bytes: float, gpus: int, fabric: Fabric, batch: int, img_s: float, bytes_per_image: float,
         overlap: float) -> StepModel:
    compute = batch / img_s
    comm = allreduce_time(gradient_bytes, gpus, fabric)
    hidden = overlap * (2.0 / 3.0) * compute
    exposed = 0.0 if gpus <= 1 else max(comm - hidden, last_bucket_time(gradient_bytes, gpus, fabric))
    efficiency = compute / (compute + exposed)
    per_node = min(gpus, fabric.gpus_per_node)
    nodes = math.ceil(gpus / fabric.gpus_per_node)
    steps_per_s = 1.0 / (compute + exposed)
    data = per_node * batch * bytes_per_image * steps_per_s
    gradients = (2 * (nodes - 1) / nodes * gradient_bytes * steps_per_s) if nodes > 1 else 0.0
    return StepModel(compute, comm, exposed, efficiency, (data + gradients) / GB)


# ------------------------------------------------------------------------------------------------ report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nvlink-gbs", type=float, default=450.0,
                        help="NVLink all-reduce bus bandwidth per GPU, GB/s (H100 SXM: 450 per direction)")
    parser.add_argument("--eth-efficiency", type=float, default=0.7,
                        help="fraction of Ethernet line rate NCCL reaches over TCP sockets (no RDMA)")
    parser.add_argument("--nvlink-alpha-us", type=float, default=5.0, help="latency per ring step on NVLink, µs")
    parser.add_argument("--tcp-alpha-us", type=float, default=50.0, help="latency per ring step over TCP, µs")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="fraction of the backward pass that hides all-reduce (DDP bucket overlap)")
    parser.add_argument("--target", type=float, default=0.90, help="scaling efficiency called efficient")
    parser.add_argument("--nic-budget", type=float, default=0.8,
                        help="share of a node's effective NIC rate that S3 reads + gradients may use")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (prepare's default: 90)")
    parser.add_argument("--samples", type=int, default=48, help="images per JPEG-size measurement")
    args = parser.parse_args()

    print("# scaling_model.py")
    print(f"- command: `{' '.join(['python tests/bench/scaling_model.py', *sys.argv[1:]])}`")
    print(f"- machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}; "
          f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"- assumptions: NVLink busbw {args.nvlink_gbs:.0f} GB/s per GPU, alpha {args.nvlink_alpha_us:.0f} µs; "
          f"Ethernet at {args.eth_efficiency:.0%} of line rate over TCP, alpha {args.tcp_alpha_us:.0f} µs; "
          f"DDP buckets of 25 MB; backward = 2/3 of a step, {args.overlap:.0%} of it hides all-reduce; "
          f"efficient = ≥ {args.target:.0%} and NIC ≤ {args.nic_budget:.0%} of its effective rate")

    # 1. gradient volume
    demo = Taxonomy.demo()
    demo_heads = {rank: demo.num_classes(rank) for rank in demo.ranks}
    sizes = {}
    for backbone in ("resnet50", "efficientnet_b3"):
        for name, heads in ((f"demo ({'/'.join(str(v) for v in demo_heads.values())})", demo_heads),
                            (f"realistic ({'/'.join(str(v) for v in REALISTIC_HEADS.values())})", REALISTIC_HEADS)):
            sizes[(backbone, name.split()[0])] = count(backbone, heads, name)
    print("\n## 1. Gradient volume per step (3 rank heads: order/family/species classes)\n")
    print("| model | taxonomy | backbone params | head params | total params | fp32 gradients MB | "
          "bf16-compressed MB | BN buffers broadcast MB | DDP buckets |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (backbone, _), size in sizes.items():
        print(f"| {backbone} | {size.taxonomy} | {size.backbone_params / 1e6:.2f} M | {size.head_params / 1e6:.2f} M | "
              f"{size.params / 1e6:.2f} M | {size.gradient_bytes() / 1e6:.1f} | {size.gradient_bytes(2) / 1e6:.1f} | "
              f"{size.buffers * 4 / 1e6:.2f} | {math.ceil(size.gradient_bytes() / BUCKET_BYTES)} |")

    # 2. JPEG bytes per image and the S3 feed per GPU
    sides = sorted({side for _, _, side, _, _ in ANCHORS} | {256})
    jpeg = jpeg_sizes(sides, args.quality, args.samples)
    print(f"\n## 2. Bytes per pre-resized JPEG crop (quality {args.quality}, mean of {args.samples})\n")
    print("| source | " + " | ".join(f"{s} px KB" for s in sides) + " |")
    print("|---|" + "---|" * len(sides))
    for source, by_side in jpeg.items():
        print(f"| {source} | " + " | ".join(f"{by_side[s] / 1e3:.1f}" for s in sides) + " |")
    conservative = {s: max(by_side[s] for by_side in jpeg.values()) for s in sides}
    print("\nS3 (or any storage) must feed each GPU, at the anchor speed, with crops stored at the training size "
          "(the larger of the sizes above; with `prepare`'s default 256 px crops in the last column):\n")
    print("| model | anchor img/s per GPU | KB per crop at input size | MB/s per GPU | MB/s per GPU, 256 px crops | "
          "per 8-GPU node, Gb/s (input-size / 256 px crops) |")
    print("|---|---|---|---|---|---|")
    for label, _, side, _, img_s in ANCHORS:
        rate = img_s * conservative[side] / 1e6
        stored = img_s * max(conservative[side], conservative[256]) / 1e6  # a crop is never stored below input
        print(f"| {label} | {img_s:,.0f} | {conservative[side] / 1e3:.1f} | {rate:,.0f} | {stored:,.0f} | "
              f"{8 * rate * 8 / 1e3:.1f} / {8 * stored * 8 / 1e3:.1f} |")

    per_process = PIL_16_PROCESSES_IMG_S / 16
    print(f"\nDecode to keep a GPU at its anchor speed, from the decode rates of 256 px crops (PIL with draft mode: "
          f"{per_process:.0f} img/s per process, {PIL_16_PROCESSES_IMG_S:,.0f} on 16; nvjpeg "
          f"{NVJPEG_IMG_S:,.0f} img/s on one H100):\n")
    print("| model | anchor img/s per GPU | CPU decode processes per GPU (256 px crops) | nvjpeg share of its rate |")
    print("|---|---|---|---|")
    for label, _, _, _, img_s in ANCHORS:
        print(f"| {label} | {img_s:,.0f} | {img_s / per_process:.1f} | {img_s / NVJPEG_IMG_S:.0%} |")

    # 3. all-reduce time and efficiency
    eff = args.eth_efficiency
    fabrics = [
        Fabric("1 node, 8 GPUs, NVLink", 8, args.nvlink_gbs, math.inf, args.nvlink_alpha_us * 1e-6, 0.0, 8),
        Fabric("1 GPU per node, 25 GbE", 1, args.nvlink_gbs, 25 / 8 * eff, 0.0, args.tcp_alpha_us * 1e-6, 4096),
        Fabric("1 GPU per node, 100 GbE", 1, args.nvlink_gbs, 100 / 8 * eff, 0.0, args.tcp_alpha_us * 1e-6, 4096),
        Fabric("8-GPU nodes, 25 GbE between", 8, args.nvlink_gbs, 25 / 8 * eff, args.nvlink_alpha_us * 1e-6,
               args.tcp_alpha_us * 1e-6, 4096),
        Fabric("8-GPU nodes, 100 GbE between", 8, args.nvlink_gbs, 100 / 8 * eff, args.nvlink_alpha_us * 1e-6,
               args.tcp_alpha_us * 1e-6, 4096),
    ]
    nic_rate = {f.name: (f.inter_gbs if math.isfinite(f.inter_gbs) else math.inf) for f in fabrics}
    realistic = {backbone: sizes[(backbone, "realistic")] for backbone in ("resnet50", "efficientnet_b3")}
    print("\n## 3. Ring all-reduce time per step (realistic taxonomy, fp32 gradients), ms\n")
    counts = [2, 8, 16, 64]
    print("| model | fabric | " + " | ".join(f"{n} GPUs" for n in counts) + " | compute per step ms |")
    print("|---|---|" + "---|" * len(counts) + "---|")
    for label, backbone, side, batch, img_s in ANCHORS:
        grad = realistic[backbone].gradient_bytes()
        for fabric in fabrics:
            cells = [f"{allreduce_time(grad, n, fabric) * 1e3:.1f}" if n <= fabric.max_gpus else "–" for n in counts]
            print(f"| {label} | {fabric.name} | " + " | ".join(cells) + f" | {batch / img_s * 1e3:.1f} |")

    print(f"\n## 4. Largest efficient data-parallel size (efficiency ≥ {args.target:.0%}, NIC within budget)\n")
    print("| model | fabric | efficiency at 8 / 16 / 64 GPUs | NIC GB/s per node at 16 GPUs (of effective) | "
          "largest efficient GPUs | limited by | same, bf16-compressed gradients |")
    print("|---|---|---|---|---|---|---|")
    for label, backbone, side, batch, img_s in ANCHORS:
        size = realistic[backbone]
        for fabric in fabrics:
            results = []
            for compress in (4, 2):
                grad = size.gradient_bytes(compress)
                largest, reason = 1, "—"
                n = 2
                while n <= fabric.max_gpus:
                    model = step(grad, n, fabric, batch, img_s, conservative[side], args.overlap)
                    budget = args.nic_budget * nic_rate[fabric.name]
                    if model.efficiency < args.target:
                        reason = f"communication (efficiency {model.efficiency:.3f} at {n})"
                        break
                    if model.nic_gbs > budget:
                        reason = f"NIC ({model.nic_gbs:.2f} GB/s needed at {n})"
                        break
                    largest, n = n, n * 2
                else:
                    reason = "one node" if fabric.max_gpus == 8 else f"none up to {fabric.max_gpus}"
                results.append((largest, reason))
            effs = [step(size.gradient_bytes(), n, fabric, batch, img_s, conservative[side], args.overlap).efficiency
                    if n <= fabric.max_gpus else None for n in (8, 16, 64)]
            at16 = step(size.gradient_bytes(), min(16, fabric.max_gpus), fabric, batch, img_s, conservative[side],
                        args.overlap)
            nic = "–" if not math.isfinite(nic_rate[fabric.name]) else \
                f"{at16.nic_gbs:.2f} ({nic_rate[fabric.name]:.2f})"
            print(f"| {label} | {fabric.name} | " + " / ".join("–" if e is None else f"{e:.2f}" for e in effs) +
                  f" | {nic} | {results[0][0]} (global batch {results[0][0] * batch:,}) | {results[0][1]} | "
                  f"{results[1][0]} |")


if __name__ == "__main__":
    main()
