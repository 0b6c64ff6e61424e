"""The throughput benchmark that ``benchmarks/throughput.py`` runs, one module per concern
(each imports only those above it here):

    shapes        the model shapes compared, and the default batch per shape and device
    peers         the implementations: vit-mqa's attention variants, vit-pytorch, HF ViT
    meters        timing, FLOP counting, the memory meter, the dense-matmul peak
    studies       the data pipeline's share of a step; images/s against batch and tokens
    speed_levers  vit-mqa's default path against one change at a time
    suite         the whole run: every implementation of every shape, into one report
    tables        the report as markdown tables, and its JSON and markdown files
    cli           the command line

The names below are importable from here (``from benchmarks import throughput_bench``).
"""

from .cli import main
from .meters import (
    BenchOptions,
    MemoryMeter,
    Runner,
    count_flops,
    make_runner,
    math_attention,
    matmul_peak,
    prepare,
    synchronize,
    time_round_robin,
)
from .peers import (
    PEERS,
    PeerUnavailable,
    build_hf_vit,
    build_vit_mqa,
    build_vit_pytorch,
    implementations,
)
from .shapes import SHAPES, Shape, default_batch
from .speed_levers import (
    LEVERS,
    ConvPatchEmbed,
    ExpandedKV,
    SeparateQKV,
    fused_attention_everywhere,
    lever_description,
    levers,
    swap_attention,
)
from .studies import kv_bytes_per_image, kv_scaling, pipeline_share, scaling
from .suite import add_ratios, bench_shape, environment, run_benchmark
from .tables import markdown, markdown_table, write_report

__all__ = [
    "LEVERS", "PEERS", "SHAPES", "BenchOptions", "ConvPatchEmbed", "ExpandedKV", "MemoryMeter",
    "PeerUnavailable", "Runner", "SeparateQKV", "Shape", "add_ratios", "bench_shape",
    "build_hf_vit", "build_vit_mqa", "build_vit_pytorch", "count_flops", "default_batch",
    "environment", "fused_attention_everywhere", "implementations", "kv_bytes_per_image",
    "kv_scaling", "lever_description", "levers", "main", "make_runner", "markdown",
    "markdown_table", "math_attention", "matmul_peak", "pipeline_share", "prepare",
    "run_benchmark", "scaling", "swap_attention", "synchronize", "time_round_robin",
    "write_report",
]
