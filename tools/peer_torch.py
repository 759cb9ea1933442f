"""Optional peer benchmark: the same U-Net train step in PyTorch on this machine's CPU, for comparison.

Not part of the package and not in requirements.txt (install `pip install torch==2.13.0`, which this machine
has on disk). Same network as `mrirecon_jax.models.unet` (3x3 conv pairs with ReLU, 2x2 max pooling, 2x2 stride-2
transposed convolutions, 1x1 head), MSE loss, Adam; no corruptions (compare with the benchmark job's
`images_per_s_no_corruption` for `--loss=mse`). Prints one JSON line per configuration.

By default it uses PyTorch's fastest CPU set-up measured on the 2-core Xeon: the fused Adam kernel (`fused=True`:
12.4 images/s at 64 px against 10.3 with the default multi-tensor Adam; `--optimizer=foreach` times the
default), and it times both memory formats (contiguous NCHW was faster at 32 and 64 px, channels-last at 128 px),
one line each; the benchmark job's `--peer=torch` keeps the faster.

    python -m tools.peer_torch --model=thesis --image_sizes=32,64 --batch_sizes=8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

FEATURES = {"tiny": (4, 8, 16), "small": (16, 32, 64, 128), "thesis": (64, 128, 256, 512, 1024)}


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
                         nn.ReLU())


class UNet(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.down = nn.ModuleList(conv_block(a, b) for a, b in zip((1,) + features[:-2], features[:-1]))
        self.bottleneck = conv_block(features[-2], features[-1])
        self.up = nn.ModuleList(nn.ConvTranspose2d(a, b, 2, stride=2)
                                for a, b in zip(features[:0:-1], features[-2::-1]))
        self.up_blocks = nn.ModuleList(conv_block(2 * c, c) for c in features[-2::-1])
        self.head = nn.Conv2d(features[0], 1, 1)

    def forward(self, x):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.up, self.up_blocks, reversed(skips)):
            x = block(torch.cat([torch.relu(up(x)), skip], dim=1))
        return torch.relu(self.head(x))


MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def time_train_step(model_name: str, size: int, batch: int, steps: int, bf16: bool, optimizer: str,
                    memory_format: str) -> dict:
    torch.manual_seed(0)
    model = UNet(FEATURES[model_name]).to(memory_format=MEMORY_FORMATS[memory_format])
    optimizer_options = {"fused": {"fused": True}, "foreach": {"foreach": True}}[optimizer]
    adam = torch.optim.Adam(model.parameters(), lr=1e-4, **optimizer_options)
    images = torch.rand(batch, 1, size, size).to(memory_format=MEMORY_FORMATS[memory_format])

    def step():
        adam.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.mse_loss(model(images).float(), images)
        loss.backward()
        adam.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"framework": f"torch {torch.__version__}", "threads": torch.get_num_threads(), "model": model_name,
            "params": sum(p.numel() for p in model.parameters()), "image_size": size, "batch_size": batch,
            "dtype": "bfloat16-autocast" if bf16 else "float32", "optimizer": f"Adam({optimizer})",
            "memory_format": memory_format, "step_s": median, "images_per_s": batch / median}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="thesis", choices=sorted(FEATURES))
    parser.add_argument("--image_sizes", default="32,64")
    parser.add_argument("--batch_sizes", default="8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bf16", action="store_true", help="also time with bfloat16 autocast")
    parser.add_argument("--optimizer", default="fused", choices=["fused", "foreach"],
                        help="Adam implementation: fused (fastest on CPU) or foreach (PyTorch's default)")
    parser.add_argument("--memory_formats", default="contiguous,channels_last",
                        help="comma-separated: contiguous, channels_last")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    for size in map(int, args.image_sizes.split(",")):
        for batch in map(int, args.batch_sizes.split(",")):
            for bf16 in (False, True) if args.bf16 else (False,):
                for memory_format in args.memory_formats.split(","):
                    row = time_train_step(args.model, size, batch, args.steps, bf16, args.optimizer, memory_format)
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
