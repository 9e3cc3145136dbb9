"""The ``elsa`` command line: encode, inspect, extract, verify, demo, compare, convert, levels.

Every command has ``--help``. Errors print one line ``elsa: error: ...`` and exit with status 2
(bad input) or 1 (``verify`` found a broken invariant).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from ..argparsing import Parser
from ..errors import ELSAError
from .messages import cli_message, one_line, safe_text
from .options import DTYPES as _DTYPES
from .options import levels_arg as _levels


def _fmt_db(x) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.1f}"


def cmd_encode(a) -> int:
    from ..oneshot.stream import encode_file, limit_heap_retention

    limit_heap_retention()  # freed chunk temporaries leave the process (see its docstring)
    t0 = time.perf_counter()
    meta = encode_file(
        a.input,
        a.output,
        levels=_levels(a.levels) if a.levels else None,
        counters=a.counters,
        structure=a.structure,
        distribution=a.distribution,
        dtype=_DTYPES[a.dtype] if a.dtype else None,
        code_bits=a.code_bits,
        progress=not a.quiet,
        jobs=a.jobs,
        max_shard_size=a.max_shard_size,
    )
    dt = time.perf_counter() - t0
    worst = min((ti.sqnr_db for ti in meta.tensors.values() if ti.sqnr_db is not None), default=math.inf)
    print(
        f"wrote {a.output}: {len(meta.tensors)} encoded tensors, T={meta.num_levels}, k={meta.code_bits}, "
        f"sparsity per level {', '.join(f'{s:.3f}' for s in meta.sparsities())}, worst dense SQNR {_fmt_db(worst)} dB, {dt:.2f} s"
    )
    return 0


def inspect_dict(path: str) -> dict:
    """The facts ``elsa inspect`` prints, as a JSON-ready dict."""
    from ..format.file import read_meta

    meta = read_meta(path)
    return {
        "file": path,
        "format": meta.format,
        "version": meta.version,
        "num_levels": meta.num_levels,
        "code_bits": meta.code_bits,
        "levels": [
            {"level": lv.level, "structure": lv.structure, "sparsity": lv.sparsity, "density": lv.density}
            for lv in meta.levels
        ]
        + [{"level": meta.num_levels + 1, "structure": "dense", "sparsity": 0.0, "density": 1.0}],
        "tensors": {
            n: {
                "shape": ti.shape,
                "dtype": ti.dtype,
                "sparsity": ti.sparsity,
                "max_ulp": ti.max_ulp,
                "sqnr_db": ("inf" if ti.sqnr_db is not None and math.isinf(ti.sqnr_db) else ti.sqnr_db),
                "transposed": ti.transposed,
                "tied_to": meta.tied.get(n),
            }
            for n, ti in meta.tensors.items()
        },
        "bn_modules": meta.bn_modules,
        "tied": dict(meta.tied),
        "quality": meta.quality,
    }


def cmd_inspect(a) -> int:
    d = inspect_dict(a.file)
    if a.json:
        print(json.dumps(d, indent=1))
        return 0
    T, s = d["num_levels"], safe_text  # every string read from the file is printed through safe_text
    print(f"{s(d['file'])}: {s(d['format'])} v{s(d['version'])}, T={T} sparse levels + dense, k={d['code_bits']} code bits")
    print(f"{'level':>5}  {'structure':<14} {'sparsity':>8} {'density':>8}")
    for lv in d["levels"]:
        print(f"{lv['level']:>5}  {s(lv['structure']):<14} {lv['sparsity']:>8.4f} {lv['density']:>8.4f}")
    if d["bn_modules"]:
        print(f"per-level batch-norm statistics for {len(d['bn_modules'])} modules")
    if d["quality"] is not None:
        from .hf import quality_lines

        print(quality_lines(d["quality"]))
    print()
    hdr = " ".join(f"{'s@L' + str(t):>6}" for t in range(1, T + 1))
    print(f"{'tensor':<48} {'shape':<18} {'dtype':<9} {hdr}  max_ulp  SQNR dB")
    for n, ti in d["tensors"].items():
        sp = " ".join(f"{s:>6.3f}" for s in ti["sparsity"])
        sq = ti["sqnr_db"]
        sq = sq if isinstance(sq, str) else _fmt_db(sq)
        mu = "-" if ti["max_ulp"] is None else f"{ti['max_ulp']:g}"
        notes = ([f"tied to {s(ti['tied_to'])} (stored once)"] if ti["tied_to"] else []) + (["[in, out]"] if ti["transposed"] else [])
        note = f"  {', '.join(notes)}" if notes else ""
        print(f"{s(n):<48} {str(tuple(ti['shape'])):<18} {s(ti['dtype']):<9} {sp}  {mu:>7}  {s(sq):>7}{note}")
    return 0


def cmd_extract(a) -> int:
    from ..format.encode import extract, resolve_level
    from ..format.file import load_file, read_meta, write_plain

    level = resolve_level(a.level, read_meta(a.file).num_levels)  # before reading any tensor
    enc = load_file(a.file)
    sd = extract(enc, level)
    write_plain(sd, a.output, {"format": "pt", "elsa_level": str(level)})
    print(f"wrote {safe_text(a.output)}: level {level} of {safe_text(a.file)} ({len(sd)} tensors)")
    return 0


def verify_file(path: str) -> list:
    """Check every invariant of an ELSA file; return the list of problems (empty = valid), each
    one line.

    :func:`elsa_codec.load_file` checks the file (header or index checksum, the metadata
    document, the CRC-32 of every tensor, every code in ``0..T``, recorded sparsities per tensor
    and per level equal to the measured ones, level structures (N:M, block), batch-norm
    statistics covering levels ``1..T+1``): a file it refuses is one problem, its message. A file
    it reads must also hold finite encoded tensors. A temporary file of an interrupted write of
    ``path`` (a killed process) is one more problem each.
    """
    from ..errors import ELSAFormatError
    from ..format.atomic import stale_temporaries
    from ..format.file import load_file

    stale = [f"{p}: a temporary file left by a killed write of this file (remove it; the next write does)"
             for p in stale_temporaries(path)]
    try:
        enc = load_file(path)
    except ELSAFormatError as e:
        return [str(e)] + stale
    return [f"{n}: holds NaN or Inf" for n in enc.meta.tensors if not torch.isfinite(enc[n]).all()] + stale


def cmd_verify(a) -> int:
    problems = verify_file(a.file)
    if problems:
        for p in problems:
            print(f"elsa verify: {safe_text(a.file)}: {one_line(p)}", file=sys.stderr)
        return 1
    print(f"{safe_text(a.file)}: OK")
    return 0


#: Commands that write a file, and the arguments holding their input and output paths.
_OUTPUTS = {"encode": ("input", "output"), "extract": ("file", "output")}

#: Commands that write exactly one safetensors file (no shards, no index).
_SINGLE_FILE = {"extract"}


def _check_output(a) -> None:
    """The output path of ``encode`` / ``extract``, checked before any input is read.

    Raises:
        ELSAError: the path is refused by :func:`~elsa_codec.checks.check_out_path`, or it names
            an index (``*.index.json``) for a command that writes one safetensors file.
    """
    from ..checks import check_out_path

    src, dst = _OUTPUTS[a.command]
    out = getattr(a, dst)
    if a.command in _SINGLE_FILE and str(out).lower().endswith(".index.json"):
        raise ELSAError(f"-o/--output {out!r}: elsa {a.command} writes one safetensors file, not shards "
                        "plus an index; give a name ending in .safetensors")
    check_out_path(out, what="-o/--output", inputs=[getattr(a, src)])


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="elsa",
        description="ELSA codec: nested sparse levels stored in the low mantissa bits of the weights (arXiv 2312.06872).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    e = sub.add_parser("encode", help="encode a safetensors checkpoint into an ELSA file", description="Encode a safetensors checkpoint (or sharded index) into one ELSA file (or shards plus an index), streaming chunk by chunk.")
    e.add_argument("input", help="input .safetensors or .safetensors.index.json")
    e.add_argument("-o", "--output", required=True, help="output ELSA .safetensors (written atomically)")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--levels", help="sparsest first: sparsities '0.9,0.75,0.5' or N:M patterns '1:4,2:4'")
    g.add_argument("--counters", help="counters .safetensors made by training (elsa_codec.save_counters)")
    e.add_argument("--structure", default="unstructured", help="for fractional levels: 'unstructured' or 'block:RxC' (default unstructured)")
    e.add_argument("--distribution", default="uniform", choices=["uniform", "global"], help="per-tensor sparsity: same everywhere, or one global threshold")
    e.add_argument("--dtype", choices=sorted(_DTYPES), help="convert floating tensors to this dtype first")
    e.add_argument("--code-bits", type=int, help="k, default max(1, ceil(log2(T+1)))")
    e.add_argument("--jobs", type=int, default=1, help="worker processes, one input shard each (same output; default 1)")
    e.add_argument("--max-shard-size", help="write shards of at most this size plus an index (e.g. '5GB'); "
                   "implied (5GB) when -o ends with .safetensors.index.json")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_encode)

    i = sub.add_parser("inspect", help="levels, code bits, sparsity and encoding error of an ELSA file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_inspect)

    x = sub.add_parser("extract", help="write one level as a plain safetensors file any loader reads")
    x.add_argument("file")
    x.add_argument("--level", required=True, help="1..T, T+1 or 'dense' (any case)")
    x.add_argument("-o", "--output", required=True)
    x.set_defaults(func=cmd_extract)

    v = sub.add_parser("verify", help="check every invariant; exit 1 with the reason if one fails")
    v.add_argument("file")
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser("demo", help="train ELSA on the handwritten digits and serve every level (the main job)", add_help=False)
    d.add_argument("args", nargs=argparse.REMAINDER)
    d.set_defaults(func=_demo)

    c = sub.add_parser("compare", help="the sparsification methods as ELSA levels and separate networks (digits)",
                       add_help=False)
    c.add_argument("args", nargs=argparse.REMAINDER)
    c.set_defaults(func=_compare)

    from .hf import add_parsers
    from .plans import add_parser as add_plans

    add_parsers(sub)
    add_plans(sub)
    return p


def _demo(a) -> int:
    from ..examples.digits.demo import main as demo_main

    return demo_main(a.args)


def _compare(a) -> int:
    from ..examples.digits.compare import main as compare_main

    return compare_main(a.args)


def main(argv=None) -> int:
    """Entry point of the ``elsa`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if hasattr(__import__("signal"), "SIGPIPE") and argv is not None:
        import signal

        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `elsa inspect F | head` ends quietly
    p = build_parser()
    # demo and compare own their options (including --help): pass everything after the command on.
    if argv and argv[0] in ("demo", "compare"):
        a = argparse.Namespace(args=argv[1:], func=p._subparsers._group_actions[0].choices[argv[0]].get_default("func"))
    else:
        a = p.parse_args(argv)
    if not getattr(a, "func", None):
        p.print_help()
        return 2
    try:
        if getattr(a, "command", None) in _OUTPUTS:
            _check_output(a)
        return int(a.func(a) or 0)
    except (ELSAError, ValueError, TypeError) as e:  # bad input: one line, no traceback
        print(f"elsa: error: {cli_message(e, getattr(a, 'command', None))}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no (permissions, space, a name too long)
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        print(f"elsa: error:{where} {one_line(e.strerror or e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("elsa: interrupted (no output written)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
