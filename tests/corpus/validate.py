"""Validate the corpus: every correct op is right, every twin's bug is real, and the measured
torch.autograd.gradcheck verdicts written in manifest.py still hold.

    python tests/corpus/validate.py            # check, print the table, exit 1 on any problem
    python tests/corpus/validate.py --update   # measure gradcheck and write the values into manifest.py

For every entry (float64, seed 0):
* imports every ops module twice, under two module names (custom-op registration must be
  guarded; the second import must bind the very same CustomOpDef objects);
* runs forward + backward with random grad_outputs;
* measures torch.autograd.gradcheck with default settings on the entry as is, and, for entries
  with spd / symmetric / simplex / unit_norm inputs, again through a wrapper that keeps the
  perturbations in the domain ((x + x^T) / 2; x - (sum(x) - 1) / n; x / |x|);
* correct ops ("pass" / "warn"): forward and first-order VJPs (with contiguous, transposed and
  expanded grad_outputs, and with only the first output used) must agree with the plain-torch
  reference in references.py, compared only along the input domain (symmetric part, zero-sum
  part, tangent part) where the domain is restricted. "warn" entries must really return a
  gradient of the wrong shape/dtype from backward (which the engine then repairs).
* twins ("fail"): at least one probe must tell the twin from its correct op on the same inputs
  (the "evidence" column): vjp (random contiguous grad_outputs), vjp_T (transposed
  grad_outputs), vjp_exp (expanded, stride-0 grad_outputs, as from y.sum()), vjp_first (only the
  first output used), double (double backward), retain (a second backward on the same graph),
  inputs_mutated, grad_output_mutated, opcheck (torch.library.opcheck, custom ops only).
  Domain-restricted inputs are compared along the domain only, so a "nonsymmetric" twin must
  differ for symmetric perturbations. A twin entry marked "pass" must show no evidence.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import re
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")  # before importing torch: "Failed to initialize NumPy" etc.

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import manifest  # noqa: E402
from inputs import make_inputs  # noqa: E402
from references import REFERENCES  # noqa: E402

ENTRIES = manifest.ENTRIES
SEED = 0
PROJECTED = ("spd", "symmetric", "simplex", "unit_norm")
# correct ops that are meant to be twice differentiable: their double backward must match
SECOND_ORDER = {"my_cube", "MyCube", "my_tanh", "fused_lrelu", "MishFunction"}


# ------------------------------------------------------------------------------------- loading
def _load(rel, name):
    spec = importlib.util.spec_from_file_location(name, HERE / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MODULES = {}


def import_all(problems):
    for rel in sorted({e.module for e in ENTRIES}):
        stem = Path(rel).stem
        first = _load(rel, f"corpus_ops_{stem}")
        try:
            again = _load(rel, f"corpus_ops_{stem}_again")
        except Exception as exc:  # registering twice must not fail
            problems.append(f"{rel}: second import failed: {type(exc).__name__}: {exc}")
            again = None
        if again is not None:
            for name, obj in vars(first).items():
                if type(obj).__name__ == "CustomOpDef" and vars(again).get(name) is not obj:
                    problems.append(f"{rel}: {name}: second import bound a different CustomOpDef")
        MODULES[rel] = first


def resolve(module, op, kind):
    mod = MODULES[module]
    if kind == "torch.ops":
        obj = torch.ops
        for part in op.split(".")[2:]:
            obj = getattr(obj, part)
        return obj
    obj = getattr(mod, op)
    return obj.apply if kind == "Function" else obj


def correct_entry_of(entry):
    for e in ENTRIES:
        if e.op == entry.twin_of and e.module == entry.module and e.twin_of is None:
            return e
    raise KeyError(f"{entry.key}: twin_of {entry.twin_of!r} has no correct entry")


# --------------------------------------------------------------------------------------- helpers
def as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def specs(entry):
    return list(entry.inputs.values())


def is_spec(v):
    return isinstance(v, manifest.T)


def diff_positions(entry):
    return [i for i, v in enumerate(specs(entry)) if is_spec(v) and v.dtype == "float" and v.requires_grad]


def fresh(entry):
    args, _ = make_inputs(entry, torch.float64, SEED)
    return args


def make_grad(shape, layout, gen):
    shape = tuple(shape)
    if layout == "contig" or len(shape) == 0:
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    if layout == "T":
        if len(shape) == 1:
            return torch.randn(2 * shape[0], generator=gen, dtype=torch.float64)[::2]
        rev = tuple(reversed(range(len(shape))))
        return torch.randn(tuple(reversed(shape)), generator=gen, dtype=torch.float64).permute(rev)
    if layout == "exp":
        return torch.randn((), generator=gen, dtype=torch.float64).expand(shape)
    raise ValueError(layout)


def project(g, spec, x):
    """The part of a gradient that the input domain can see."""
    if g is None:
        return None
    if spec.domain in ("spd", "symmetric"):
        return 0.5 * (g + g.transpose(-1, -2))
    if spec.domain == "simplex":
        return g - g.mean(-1, keepdim=True)
    if spec.domain == "unit_norm":
        return g - (g * x).sum(-1, keepdim=True) * x
    return g


def domain_wrap(spec, x):
    """Keep gradcheck's perturbations inside the domain (identity at the sampled point)."""
    if spec.domain in ("spd", "symmetric"):
        return 0.5 * (x + x.transpose(-1, -2))
    if spec.domain == "simplex":
        return x - (x.sum(-1, keepdim=True) - 1) / x.shape[-1]
    if spec.domain == "unit_norm":
        return x / x.norm(dim=-1, keepdim=True)
    return x


def short(exc):
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:110]


class Err:
    def __init__(self, exc):
        self.msg = short(exc)

    def __repr__(self):
        return f"Err({self.msg})"


def differs(a, b, rel=1e-9):
    """a, b: lists of tensors/None (None == zeros), or Err, or plain values."""
    if isinstance(a, Err) or isinstance(b, Err):
        return isinstance(a, Err) != isinstance(b, Err)
    if not isinstance(a, list):
        return a != b
    if len(a) != len(b):
        return True
    for x, y in zip(a, b):
        if x is None and y is None:
            continue
        if x is None or y is None:
            t = x if y is None else y
            if t.numel() and float(t.abs().max()) > 0:
                return True
            continue
        if x.shape != y.shape:
            return True
        if x.dtype in (torch.int64, torch.bool) or y.dtype in (torch.int64, torch.bool):
            if not torch.equal(x, y):
                return True
            continue
        x, y = x.double(), y.double()
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            if not torch.equal(torch.isfinite(x), torch.isfinite(y)):
                return True
            x, y = torch.nan_to_num(x), torch.nan_to_num(y)
        scale = max(1.0, float(y.abs().max()) if y.numel() else 1.0)
        if y.numel() and float((x - y).abs().max()) > rel * scale:
            return True
    return False


# ---------------------------------------------------------------------------------------- probes
def probe_vjp(fn, entry, layout="contig", first_only=False, order=1, twice=False):
    """Gradients w.r.t. the differentiable inputs, projected onto the input domain."""
    args = fresh(entry)
    pos = diff_positions(entry)
    sp = specs(entry)
    xs = [args[i] for i in pos]
    try:
        outs = [o for o in as_tuple(fn(*args)) if isinstance(o, torch.Tensor) and o.requires_grad]
        gen = torch.Generator().manual_seed(1234)
        gos = [make_grad(o.shape, layout, gen) for o in outs]
        if first_only:
            outs, gos = outs[:1], gos[:1]
        grads = torch.autograd.grad(outs, xs, gos, allow_unused=True, create_graph=(order == 2),
                                    retain_graph=twice or order == 2)
        if twice:
            grads = torch.autograd.grad(outs, xs, gos, allow_unused=True)
        if order == 2:
            gen2 = torch.Generator().manual_seed(4321)
            vs = [torch.randn(x.shape, generator=gen2, dtype=x.dtype) for x in xs]
            terms = [(project(g, sp[i], args[i].detach()) * v).sum() for g, v, i in zip(grads, vs, pos)
                     if g is not None and g.requires_grad]
            if not terms:
                return [None] * len(xs)
            grads = torch.autograd.grad(sum(terms), xs, allow_unused=True)
    except Exception as exc:
        return Err(exc)
    return [project(g.detach() if g is not None else None, sp[i], args[i].detach()) for g, i in zip(grads, pos)]


def probe_forward(fn, entry):
    args = fresh(entry)
    try:
        with torch.no_grad():
            return [o.detach() if isinstance(o, torch.Tensor) else o for o in as_tuple(fn(*args))]
    except Exception as exc:
        return Err(exc)


def probe_inputs_mutated(fn, entry):
    args = fresh(entry)
    before = [a.detach().clone() if isinstance(a, torch.Tensor) else None for a in args]
    try:
        outs = [o for o in as_tuple(fn(*args)) if isinstance(o, torch.Tensor) and o.requires_grad]
        xs = [args[i] for i in diff_positions(entry)]
        if outs:
            torch.autograd.grad(outs, xs, [torch.ones_like(o) for o in outs], allow_unused=True)
    except Exception:
        pass
    return [b is not None and not torch.equal(b, a.detach()) for a, b in zip(args, before)]


def probe_grad_output_mutated(fn, entry):
    args = fresh(entry)
    try:
        outs = [o for o in as_tuple(fn(*args)) if isinstance(o, torch.Tensor) and o.requires_grad]
        gen = torch.Generator().manual_seed(1234)
        gos = [make_grad(o.shape, "contig", gen) for o in outs]
        copies = [g.clone() for g in gos]
        torch.autograd.grad(outs, [args[i] for i in diff_positions(entry)], gos, allow_unused=True)
    except Exception:
        return [False]
    return [not torch.equal(g, c) for g, c in zip(gos, copies)]


def probe_opcheck(fn, entry):
    args = fresh(entry)
    try:
        torch.library.opcheck(fn, tuple(args), test_utils=("test_schema", "test_faketensor"))
        return "ok"
    except Exception as exc:
        m = re.search(r"(test_\w+) failed", str(exc))
        return "fail " + (m.group(1) if m else type(exc).__name__)


def n_outputs(fn, entry):
    try:
        return len([o for o in as_tuple(fn(*fresh(entry))) if isinstance(o, torch.Tensor) and o.requires_grad])
    except Exception:
        return 1


def rel_size(bad, good):
    """max |twin - correct| / max |correct| over the gradients (inf if the twin raised)."""
    if isinstance(bad, Err) or isinstance(good, Err):
        return math.inf
    num = den = 0.0
    for b, g in zip(bad, good):
        b = torch.zeros_like(g) if b is None and g is not None else b
        g = torch.zeros_like(b) if g is None and b is not None else g
        if b is None or b.shape != g.shape:
            return math.inf
        num = max(num, float((b.double() - g.double()).abs().max()))
        den = max(den, float(g.abs().max()))
    return num / den if den else math.inf


def evidence(twin_fn, good_fn, entry):
    found = []
    probes = [
        ("vjp", dict()),
        ("vjp_T", dict(layout="T")),
        ("vjp_exp", dict(layout="exp")),
    ]
    if n_outputs(good_fn, entry) > 1:
        probes.append(("vjp_first", dict(first_only=True)))
    probes += [("double", dict(order=2)), ("retain", dict(twice=True))]
    for name, kw in probes:
        good = probe_vjp(good_fn, entry, **kw)
        if isinstance(good, Err) and name in ("double", "retain"):
            continue  # the correct op itself does not support it
        bad = probe_vjp(twin_fn, entry, **kw)
        if differs(bad, good):
            found.append(name + (f"({rel_size(bad, good):.0e})" if name == "vjp" else ""))
    if probe_inputs_mutated(twin_fn, entry) != probe_inputs_mutated(good_fn, entry):
        found.append("inputs_mutated")
    if probe_grad_output_mutated(twin_fn, entry) != probe_grad_output_mutated(good_fn, entry):
        found.append("grad_output_mutated")
    if entry.kind in ("custom_op", "torch.ops"):
        if probe_opcheck(twin_fn, entry) != probe_opcheck(good_fn, entry):
            found.append("opcheck")
    return found


# -------------------------------------------------------------------------------- reference check
def reference_check(fn, entry):
    """Problems found comparing a correct op with its plain-torch reference ([] = agrees).
    A "dtype_cast" warn entry returns float32 gradients (cast back by the engine), so it is
    compared at float32 rounding (rel 1e-6) instead of 1e-9."""
    rel = 1e-6 if entry.bug == "dtype_cast" else 1e-9
    ref = REFERENCES.get(entry.op)
    if ref is None:
        return [f"no reference for {entry.op}"], None
    problems = []
    if differs(probe_forward(fn, entry), probe_forward(ref, entry)):
        problems.append("forward differs from reference")
    for name, kw in [("vjp", {}), ("vjp_T", dict(layout="T")), ("vjp_exp", dict(layout="exp")),
                     ("vjp_first", dict(first_only=True))]:
        mine = probe_vjp(fn, entry, **kw)
        if differs(mine, probe_vjp(ref, entry, **kw), rel):
            problems.append(f"{name} differs from reference" + (f" ({mine.msg})" if isinstance(mine, Err) else ""))
    second = probe_vjp(fn, entry, order=2)
    second_ok = not differs(second, probe_vjp(ref, entry, order=2), rel)
    if entry.op in SECOND_ORDER and not second_ok:
        problems.append("double backward differs from reference")
    return problems, second_ok


def warn_is_real(fn_obj, entry):
    """The raw backward (called directly on the ctx) returns a wrong shape or dtype."""
    args = fresh(entry)
    outs = [o for o in as_tuple(fn_obj.apply(*args)) if isinstance(o, torch.Tensor) and o.requires_grad]
    ctx = outs[0].grad_fn
    gos = [torch.randn(o.shape, dtype=o.dtype) for o in outs]
    raw = as_tuple(type(ctx)._forward_cls.backward(ctx, *gos))
    for g, a in zip(raw, args):
        if isinstance(g, torch.Tensor) and isinstance(a, torch.Tensor):
            if g.shape != a.shape or g.dtype != a.dtype:
                return True
    return False


# ------------------------------------------------------------------------------------ gradcheck
def gradcheck_fails(fn, entry, in_domain=False):
    args = fresh(entry)
    pos = diff_positions(entry)
    sp = specs(entry)

    def f(*xs):
        a = list(args)
        for i, x in zip(pos, xs):
            a[i] = domain_wrap(sp[i], x) if in_domain else x
        return fn(*a)

    xs = tuple(args[i] for i in pos)
    try:
        return not torch.autograd.gradcheck(f, xs), ""
    except Exception as exc:
        return True, short(exc)


def has_projected(entry):
    return any(is_spec(v) and v.domain in PROJECTED for v in entry.inputs.values())


# --------------------------------------------------------------------------------------- sanity
def sanity(entry, args):
    """Input properties a case relies on (e.g. ignored labels present, indices repeated)."""
    op = entry.op
    if op.startswith("LSRCrossEntropyFunction"):
        assert (args[1] == args[3]).any(), "no ignored pixel"
    if op.startswith("LabelSmoothingCE"):
        assert (args[1] == args[3]).any() and (args[1] != args[3]).any(), "need padding and non-padding rows"
    if op.startswith(("Gather", "Embedding_")) or op == "Embedding":
        idx = args[2] if op.startswith("Gather") else args[0]
        assert idx.unique().numel() < idx.numel(), "indices do not repeat"
    if op.startswith("ScaledMaskedSoftmax"):
        assert args[1].all(-1).any(), "no fully masked row"
        assert (args[1].any(-1) & ~args[1].all(-1)).any(), "no partly masked row"
    if op.startswith("MulticlassHinge"):
        a, y = args[0].detach(), args[1]
        m = a - a[torch.arange(a.shape[0]), y].unsqueeze(1) + args[2]
        assert float(m.abs().min()) > 1e-3, "a margin is at a kink"
    if op.startswith("fused_lrelu"):
        x = args[0].detach() + args[1].detach().view(1, -1, 1, 1)
        assert float(x.abs().min()) > 1e-3, "input at the kink"
        assert (x < 0).any() and (x > 0).any()
    if op.startswith("FocalSigmoid"):
        assert (args[1] == 0).any() and (args[1] == 1).any()
    if op.startswith("SigmoidContrastiveLoss"):
        assert torch.allclose(args[0].detach().norm(dim=-1), torch.ones(4, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ main
def update_manifest(measured):
    path = HERE / "manifest.py"
    text = path.read_text()
    start = text.index("ENTRIES: list[Entry] = [")
    head, body = text[:start], text[start:]
    spans = [m.start() for m in re.finditer(r"\n    Entry\(", body)] + [len(body)]
    assert len(spans) - 1 == len(ENTRIES), (len(spans) - 1, len(ENTRIES))
    out = [body[:spans[0]]]
    for k, entry in enumerate(ENTRIES):
        chunk = body[spans[k]:spans[k + 1]]
        gc, gcd = measured[entry.key]
        chunk = re.sub(r"gradcheck_fails=(None|True|False),", f"gradcheck_fails={gc},", chunk, count=1)
        chunk = re.sub(r"[ \t]*gradcheck_fails_in_domain=(None|True|False),", "", chunk)
        if gcd is not None:
            chunk = re.sub(r"(\n(\s*)gradcheck_fails=(True|False),)",
                           lambda m: f"{m.group(1)} gradcheck_fails_in_domain={gcd},", chunk, count=1)
        out.append(chunk)
    path.write_text(head + "".join(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="write the measured gradcheck values into manifest.py")
    opts = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    problems = []
    import_all(problems)
    keys = [e.key for e in ENTRIES]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        problems.append(f"duplicate entry keys: {sorted(dup)}")

    rows, measured = [], {}
    for entry in ENTRIES:
        fn = resolve(entry.module, entry.op, entry.kind)
        args = fresh(entry)
        try:
            sanity(entry, args)
        except AssertionError as exc:
            problems.append(f"{entry.key}: input sanity: {exc}")
        run = probe_vjp(fn, entry)
        fwd_bwd = "ok" if not isinstance(run, Err) else "error"
        gc, gc_why = gradcheck_fails(fn, entry)
        gcd = gradcheck_fails(fn, entry, in_domain=True)[0] if has_projected(entry) else None
        measured[entry.key] = (gc, gcd)

        check, second = "", ""
        if entry.twin_of is None:                      # a correct op (pass / warn)
            errs, second_ok = reference_check(fn, entry)
            second = "ok" if second_ok else "differs"
            if entry.expect == "warn" and entry.kind == "Function":
                if not warn_is_real(getattr(MODULES[entry.module], entry.op), entry):
                    errs.append("backward returns the right shape/dtype: nothing for the engine to repair")
            check = "ref ok" if not errs else "REF: " + "; ".join(errs)
            problems += [f"{entry.key}: {e}" for e in errs]
        else:                                          # a twin
            good = correct_entry_of(entry)
            good_fn = resolve(good.module, good.op, good.kind)
            ev = evidence(fn, good_fn, entry)
            if entry.expect == "fail":
                check = "evidence: " + (",".join(ev) if ev else "NONE")
                if not ev:
                    problems.append(f"{entry.key}: twin indistinguishable from {entry.twin_of}")
            else:
                check = "agrees with correct op" if not ev else "UNEXPECTED evidence: " + ",".join(ev)
                if ev:
                    problems.append(f"{entry.key}: expected to agree with {entry.twin_of}, differs in {ev}")

        if not opts.update:
            if entry.gradcheck_fails != gc:
                problems.append(f"{entry.key}: manifest gradcheck_fails={entry.gradcheck_fails}, measured {gc} {gc_why}")
            if entry.gradcheck_fails_in_domain != gcd:
                problems.append(f"{entry.key}: manifest gradcheck_fails_in_domain={entry.gradcheck_fails_in_domain}, measured {gcd}")
        if entry.expect == "pass" and entry.twin_of is None and fwd_bwd != "ok":
            problems.append(f"{entry.key}: forward+backward failed: {run.msg}")
        rows.append((entry, fwd_bwd, gc, gc_why, gcd, check, second))

    print_table(rows)
    if opts.update:
        update_manifest(measured)
        print(f"\nwrote gradcheck_fails / gradcheck_fails_in_domain for {len(measured)} entries into manifest.py")
    n_ok = sum(1 for e in ENTRIES if e.twin_of is None)
    n_twin = sum(1 for e in ENTRIES if e.twin_of is not None)
    print(f"\n{len(ENTRIES)} entries ({n_ok} correct-op cases, {n_twin} twin cases), {time.time() - t0:.1f}s")
    if problems:
        print(f"\n{len(problems)} problem(s):")
        for p in problems:
            print("  -", p)
        return 1
    print("all checks passed")
    return 0


def print_table(rows):
    def gcs(v):
        return "-" if v is None else ("FAILS" if v else "passes")

    header = ("entry", "expect", "bug", "fwd+bwd", "gradcheck", "gc in-domain", "2nd-order", "check")
    table = []
    for entry, fb, gc, why, gcd, check, second in rows:
        name = entry.op.replace("torch.ops.corpus.", "ops.") + (f"[{entry.case}]" if entry.case else "")
        table.append((f"{Path(entry.module).stem}:{name}", entry.expect, entry.bug or "", fb, gcs(gc), gcs(gcd),
                      second or "", check))
    widths = [max(len(str(r[i])) for r in table + [header]) for i in range(len(header) - 1)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    print(fmt.format(*header))
    print("-" * (sum(widths) + 2 * len(widths) + 30))
    for r in table:
        print(fmt.format(*r))


if __name__ == "__main__":
    sys.exit(main())
