"""Benchmark one GPT-2-small attention layer from a checkout: the same table as `pyqkv bench`.

    python bench/attention_layer.py --seq 128 512 1024 --context 512 2000 --json out.json --plot out.png

Rows, sizes and method are described in pyqkv/bench.py (medians of interleaved runs, ratios against
PyTorch's fused path, peak memory per row measured in a fresh process).
"""

import sys

from pyqkv import bench

if __name__ == "__main__":
    sys.exit(bench.main())
