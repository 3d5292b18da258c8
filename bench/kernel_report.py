"""bench_kernels: RESULTS.md and the plot, from the results document."""

from __future__ import annotations

import pathlib
import sys


HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from chunkllm_jax.chunk_generation import WORK_BLOCK  # noqa: E402
from kernel_programs import KEEP, TARGET_BW, TARGET_CONTEXT, TARGET_RETENTION, TARGET_SPEEDUP  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# Report


def best(d: dict) -> tuple[str | None, dict | None]:
  """The fastest successful entry of {name: measurement}."""
  ok = [(k, m) for k, m in d.items() if "time_s" in m]
  return min(ok, key=lambda km: km[1]["time_s"]) if ok else (None, None)


def decode_summary(doc: dict, L: int, r: float, a: dict) -> dict | None:
  """Speedups and bandwidth of one decode case against its context's dense baselines."""
  c, dn = doc["cases"].get(f"decode/{L}/{r:g}"), doc["cases"].get(f"decode_dense/{L}")
  if not c or c.get("status") != "ok":
    return None
  bw = doc["cases"].get("bandwidth", {}).get("copy_bandwidth")
  dense_name, dense = best(dn["baselines"]) if dn and dn.get("status") == "ok" else (None, None)
  ip_ns, ip = best(c["inplace"])
  cp_ns, cp = best(c["compacted"])
  mean_chunk = (a["chunk_min"] + a["chunk_max"]) / 2
  per_token = cp["time_s"] + c["gather"]["time_s"] / mean_chunk if cp and "time_s" in c.get("gather", {}) else None
  paths = {k: t for k, t in (("in place", ip and ip["time_s"]), ("compacted", per_token)) if t}
  path = min(paths, key=paths.get) if paths else None
  s = dict(c=c, dense_name=dense_name, dense=dense, ip_ns=ip_ns, ip=ip, cp_ns=cp_ns, cp=cp, per_token=per_token,
           path=path, chunk_time=paths.get(path))
  s["speedup"] = dense["time_s"] / s["chunk_time"] if dense and path else None
  frac = lambda m: m["bandwidth"] / bw if m and bw else None
  s["bw_ip"], s["bw_cp"] = frac(ip), frac(cp)
  s["bw_dense"] = c["bytes_dense"] / dense["time_s"] / bw if dense and bw else None
  fr = {k: f for k, f in (("in place", s["bw_ip"]), ("compacted", s["bw_cp"])) if f is not None}
  s["bw_best"] = max(fr.items(), key=lambda kv: kv[1]) if fr else None
  # the per-head rule (the library's default): its kernel, each KV head reading its own slots in place
  s["ph_ns"], s["ph"] = best(c.get("per_head", {}))
  s["ph_speedup"] = dense["time_s"] / s["ph"]["time_s"] if dense and s["ph"] else None
  s["bw_ph"] = frac(s["ph"])
  gathered = c.get("per_head_gathered", {})
  s["ph_vs_gathered"] = gathered["time_s"] / s["ph"]["time_s"] if s["ph"] and "time_s" in gathered else None
  return s


def prefill_summary(doc: dict, T: int, r: float, mode: str) -> dict | None:
  c = doc["cases"].get(prefill_id(T, r, mode))
  dn = doc["cases"].get(f"prefill_dense/{T}")
  if not c or c.get("status") != "ok":
    return None
  full = doc["cases"].get(prefill_id(T, 1.0, mode))
  t = c["kernel"]["time_s"]
  t_lists = c.get("lists", {}).get("time_s", 0.0)
  s = dict(c=c, t=t, t_lists=t_lists, dense=dn["dense"]["time_s"] if dn and dn.get("status") == "ok" else None,
           full=full["kernel"]["time_s"] if full and full.get("status") == "ok" else None)
  s["speedup"] = s["dense"] / (t + t_lists) if s["dense"] else None
  s["speedup_kernel"] = s["dense"] / t if s["dense"] else None
  s["vs_full"] = s["full"] / t if s["full"] else None
  return s


def prefill_id(T: int, r: float, mode: str) -> str:
  return f"prefill/{'all' if r >= 1 else mode}/{T}/{r:g}"


def target_point(doc: dict) -> tuple[int, float, str]:
  """The targets' context and retention; a smoke run judges its largest context and lowest retention instead."""
  a = doc["args"]
  if doc["smoke"]:
    return max(a["contexts"]), min(a["retentions"]), " (smoke stand-in: tiny shapes, meaningless)"
  return TARGET_CONTEXT, TARGET_RETENTION, ""


def targets(doc: dict) -> list[dict]:
  a = doc["args"]
  L, r, stand_in = target_point(doc)
  out = []
  s = decode_summary(doc, L, r, a)
  where = f"{ctx(L)}, {r:.0%}{stand_in}"
  if s and s["speedup"]:
    out.append(dict(name="decode speedup", where=where, value=s["speedup"], goal=TARGET_SPEEDUP,
                    met=s["speedup"] >= TARGET_SPEEDUP,
                    detail=f"{s['path']} path against {s['dense_name']}"))
  else:
    out.append(dict(name="decode speedup", where=where, value=None, goal=TARGET_SPEEDUP, met=None,
                    detail="not measured"))
  if s and s["bw_best"]:
    k, f = s["bw_best"]
    ns = s["ip_ns"] if k == "in place" else s["cp_ns"]
    out.append(dict(name="decode bandwidth / copy bandwidth", where=where, value=f, goal=TARGET_BW,
                    met=f >= TARGET_BW, detail=f"{k} kernel, n_splits={ns}"))
  else:
    out.append(dict(name="decode bandwidth / copy bandwidth", where=where, value=None, goal=TARGET_BW, met=None,
                    detail="not measured"))
  ph = s and s["ph_speedup"]
  out.append(dict(name="per-head decode speedup", where=where, value=ph or None, goal=TARGET_SPEEDUP,
                  met=ph >= TARGET_SPEEDUP if ph else None,
                  detail=f"the default rule's kernel, n_splits={s['ph_ns']}, against {s['dense_name']}" if ph
                  else "not measured"))
  phb = s and s["bw_ph"]
  out.append(dict(name="per-head decode bandwidth / copy bandwidth", where=where, value=phb or None, goal=TARGET_BW,
                  met=phb >= TARGET_BW if phb else None,
                  detail=f"n_splits={s['ph_ns']}" if phb else "not measured"))
  mode = a["prefill_selection"][0]
  p = prefill_summary(doc, L, r, mode)
  if p and p["speedup"]:
    out.append(dict(name="prefill speedup", where=where + f", {mode}", value=p["speedup"], goal=TARGET_SPEEDUP,
                    met=p["speedup"] >= TARGET_SPEEDUP,
                    detail=f"kernel + block lists against dense flash attention; kernel alone "
                    f"{p['speedup_kernel']:.2f}x"))
  else:
    out.append(dict(name="prefill speedup", where=where + f", {mode}", value=None, goal=TARGET_SPEEDUP, met=None,
                    detail="not measured"))
  return out


def ctx(n: int) -> str:
  return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def us(t) -> str:
  return "-" if t is None else f"{t * 1e6:.1f}"


def ms(t) -> str:
  return "-" if t is None else f"{t * 1e3:.2f}"


def x(v) -> str:
  return "-" if v is None else f"{v:.2f}x"


def pct(v) -> str:
  return "-" if v is None else f"{v:.0%}"


def render_md(doc: dict, md_path: pathlib.Path) -> str:
  a, dev, cases = doc["args"], doc["device"], doc["cases"]
  title = "SMOKE RUN: " if doc["smoke"] else ""
  L = [f"# {title}Pallas kernels on {dev['kind']}: correctness, speed, bandwidth", ""]
  if doc["smoke"]:
    L += ["**Smoke run: tiny shapes" + (", kernels in interpret mode on a CPU" if doc["interpret"] else "")
          + ". The timings, speedups and verdicts below are meaningless; only the correctness checks and that "
          "every step runs mean anything.**", ""]
  L += [f"Device: {dev['kind']} ({dev['platform']}, {dev['count']} device(s)"
        + (f", {dev['platform_version']}" if dev.get("platform_version") else "") + f"); jax {dev['jax']}"
        + (f", jaxlib {dev['jaxlib']}" if dev.get("jaxlib") else "") + f"; {dev['date']}; code {dev['code']}.", "",
        f"Command: `{doc['command']}`", "",
        f"Kernels: {doc['family'].upper()} family" + (" in interpret mode" if doc["interpret"] else "")
        + f". Shape: batch {a['batch']}, {a['heads']} query heads, {a['kv_heads']} kv heads, head_dim "
        f"{a['head_dim']} (smollm2-135m's attention); timed in {a['dtype']}. Chunks of {a['chunk_min']}-"
        f"{a['chunk_max']} tokens, n_sink {a['n_sink']}, n_local {a['n_local']}.", ""]
  # correctness
  checks = [c for k, c in cases.items() if k.startswith("check/")]
  L += ["## Correctness", "",
        "Each kernel against its jnp reference (run at `highest` precision) on fresh random inputs. Error: max "
        "|out - ref| / (1 + |ref|) (the tests' allclose with rtol = atol = bound).", "",
        "| kernel | runs as | dtype | dot precision | shape | error | bound | verdict |",
        "|---|---|---|---|---|---:|---:|---|"]
  for k, c in cases.items():
    if not k.startswith("check/"):
      continue
    if c.get("status") != "ok":
      L.append(f"| {k.split('/')[1]} | | {k.split('/')[2]} | {k.split('/')[3]} | | - | | "
               f"**error**: {c.get('error', c.get('status'))} |")
      continue
    parts = ", ".join(f"{n} {e:.1e}" for n, e in c["parts"].items()) if len(c["parts"]) > 1 else ""
    verdict = {"pass": "pass", "flag": "**flagged**", "fail": "**FAIL**"}[c["verdict"]]
    L.append(f"| {c['kernel']} | {c['impl']} | {c['dtype']} | {c['precision']} | {c['shape']} | {c['err']:.1e}"
             + (f" ({parts})" if parts else "") + f" | {c['bound']:g} | {verdict}"
             + (f": {c['why']}" if c["why"] else "") + " |")
  if not checks:
    L.append("| (not run) | | | | | | | |")
  # bandwidth
  bw = cases.get("bandwidth")
  L += ["", "## Bandwidth references", ""]
  if bw and bw.get("status") == "ok":
    L += [f"A {bw['bytes'] / 2**20:.0f} MiB float32 buffer, jitted, medians. Copy and negate count read + write "
          "bytes, read (a sum) the bytes read.", "", "| operation | time (ms) | timer | GB/s |",
          "|---|---:|---|---:|"]
    for n in ("copy", "negate", "read"):
      L.append(f"| {n} | {ms(bw[n].get('time_s', bw[n]['wall_s']))} | {bw[n].get('timer', 'wall')} | "
               f"{bw[n]['bandwidth'] / 1e9:.1f} |")
    L += ["", f"Copy bandwidth used below: {bw['copy_bandwidth'] / 1e9:.1f} GB/s (the faster of copy and negate)."]
  else:
    L.append("Not measured" + (f": {bw.get('error')}" if bw else "") + ".")
  # decode
  mean_chunk = (a["chunk_min"] + a["chunk_max"]) / 2
  L += ["", "## Decode", "",
        f"Times in microseconds per call ({timer_name(doc)}). In place: the kernel over the static buffer, blocks "
        f"of {a['decode_block']} read when they hold a visible token. Compacted: the kernel over the working "
        f"buffer ({WORK_BLOCK}-slot blocks) plus the {a['chunk_max']}-token open-chunk window, and the gather "
        f"that fills the buffer once per boundary charged per token (/ {mean_chunk:g}). Each at its best "
        f"n_splits of {a['n_splits']}. Retention: the target (the visible share of the context). Speedup: the "
        "fastest dense decode over the faster chunk path. Bandwidth: K/V bytes the kernel reads / its time, as a "
        "fraction of the copy bandwidth (BW dense: the fastest dense decode's, reading the whole context).", "",
        "| context | retention | blocks read in place | dense decode_attention | dense jax.nn xla | dense cudnn "
        "| in place | compacted | gather | compacted + gather/chunk | speedup | BW in place | BW compacted "
        "| BW dense |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  details = []
  for Lc in a["contexts"]:
    dn = cases.get(f"decode_dense/{Lc}")
    base = dn["baselines"] if dn and dn.get("status") == "ok" else {}
    bt = lambda n: us(base.get(n, {}).get("time_s"))
    for r in a["retentions"]:
      c = cases.get(f"decode/{Lc}/{r:g}")
      if not c:
        continue
      if c.get("status") != "ok":
        L.append(f"| {Lc} | {r:.0%} | | | | | | | | | **error**: {c.get('error', c.get('status'))} | | | |")
        continue
      s = decode_summary(doc, Lc, r, a)
      L.append(f"| {Lc} | {r:.0%} ({c['retention']:.1%}) | {c['listed_blocks'] / c['all_blocks']:.0%} | "
               f"{bt('decode_attention')} | {bt('jax.nn xla')} | {bt('jax.nn cudnn')} | "
               f"{us(s['ip'] and s['ip']['time_s'])} (n={s['ip_ns']}) | {us(s['cp'] and s['cp']['time_s'])} "
               f"(n={s['cp_ns']}) | {us(c['gather'].get('time_s'))} | {us(s['per_token'])} | {x(s['speedup'])} | "
               f"{pct(s['bw_ip'])} | {pct(s['bw_cp'])} | {pct(s['bw_dense'])} |")
      for ns in a["n_splits"]:
        ip, cp = c["inplace"].get(str(ns), {}), c["compacted"].get(str(ns), {})
        details.append(f"| {Lc} | {r:.0%} | {ns} | {us(ip.get('time_s'))} | {us(ip.get('wall_s'))} | "
                       f"{ms(ip.get('compile_s'))} | {us(cp.get('time_s'))} | {us(cp.get('wall_s'))} | "
                       f"{ms(cp.get('compile_s'))} |")
  L += ["", "Every n_splits (chunk_generate uses 2); times in us, compile in ms; `wall` is the wall-clock "
        "median beside the table's timer.", "",
        "| context | retention | n_splits | in place | wall | compile | compacted | wall | compile |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"] + details
  L += ["", "Per head (`selection=\"kv_head\"`, the library's default rule): each KV head reads its own slots "
        f"where they lie in the buffer (here every head reads its row's visible tokens), {WORK_BLOCK} slots a "
        "block; the kernel (`pallas_kernels/head_decode_attention`) at its best n_splits, against the XLA gather of "
        "the same slots and one softmax (its jnp reference). Times in us; speedup: the fastest dense decode over "
        "the kernel; BW: K/V bytes of the slots / the kernel's time, as a fraction of the copy bandwidth.", "",
        "| context | retention | per-head kernel | XLA gather | kernel vs gather | speedup | BW per head |",
        "|---:|---:|---:|---:|---:|---:|---:|"]
  for Lc in a["contexts"]:
    for r in a["retentions"]:
      s = decode_summary(doc, Lc, r, a)
      if s is None:
        continue
      gathered = s["c"].get("per_head_gathered", {})
      L.append(f"| {Lc} | {r:.0%} | {us(s['ph'] and s['ph']['time_s'])} (n={s['ph_ns']}) | "
               f"{us(gathered.get('time_s'))} | {x(s['ph_vs_gathered'])} | {x(s['ph_speedup'])} | "
               f"{pct(s['bw_ph'])} |")
  errs = [f"{n} at {Lc}: {m['error']}" for Lc in a["contexts"]
          for n, m in (cases.get(f"decode_dense/{Lc}") or {}).get("baselines", {}).items() if "error" in m]
  if errs:
    L += [""] + [f"- dense baseline failed: {e}" for e in errs]
  # distill
  L += ["", "## Distill", "",
        f"The teacher's attention and chunk mass P (blocks {a['distill_block_q']} x {a['distill_block_k']}) "
        "against dense causal flash attention alone (ms): the price of P.", "",
        "| context | chunks | distill | dense flash | distill / flash |", "|---:|---:|---:|---:|---:|"]
  for T in a["distill_contexts"]:
    c = cases.get(f"distill/{T}")
    if not c:
      continue
    if c.get("status") != "ok":
      L.append(f"| {T} | | **error**: {c.get('error', c.get('status'))} | | |")
      continue
    dt_ = c["dense"].get("time_s")
    L.append(f"| {T} | {c['max_chunks']} | {ms(c['kernel']['time_s'])} | {ms(dt_)} ({c['implementation']}) | "
             f"{x(c['kernel']['time_s'] / dt_ if dt_ else None)} |")
  # prefill
  L += ["", "## Prefill", "",
        f"Times in ms ({timer_name(doc)}). Blocks {a['prefill_block_q']} x {a['prefill_block_k']}; retention "
        "counts visible (query, key) pairs over causal pairs; blocks read: listed block pairs over causal block "
        "pairs; lists: building the block lists (`prefill_block_lists`, once per layer). 100% is the kernel's "
        "dense causal mode. Speedup: dense flash over kernel + lists (over the kernel alone in brackets). "
        "`vs 100%`: the kernel at 100% over the kernel here (the method's own gain).", "",
        "| context | selection | retention | selection columns | blocks read | kernel | compile (s) | lists "
        "| dense flash | speedup | vs 100% |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for mode in a["prefill_selection"]:
    for T in a["prefill_contexts"] or a["contexts"]:
      for r in a["retentions"]:
        if r >= 1 and mode != a["prefill_selection"][0]:
          continue
        cid = prefill_id(T, r, mode)
        c = cases.get(cid)
        if not c:
          continue
        if c.get("status") != "ok":
          L.append(f"| {T} | {mode} | {r:.0%} | | | **error**: {c.get('error', c.get('status'))} | | | | | |")
          continue
        s = prefill_summary(doc, T, r, mode)
        dn = cases.get(f"prefill_dense/{T}", {})
        L.append(f"| {T} | {c['selection']} | {c['retention']:.1%} | {c['n_sel']} | {c['blocks_read']:.0%} | "
                 f"{ms(s['t'])} | {c['kernel']['compile_s']:.1f} | {ms(s['t_lists'])} | {ms(s['dense'])} "
                 f"({dn.get('implementation', '-')}) | {x(s['speedup'])} ({x(s['speedup_kernel'])}) | "
                 f"{x(s['vs_full'])} |")
  # targets
  L += ["", "## Targets", ""]
  for t in targets(doc):
    verdict = {True: "**met**", False: "**not met**", None: "**not measured**"}[t["met"]]
    val = "-" if t["value"] is None else (f"{t['value']:.0%}" if "bandwidth" in t["name"] else f"{t['value']:.2f}x")
    goal = f">= {t['goal']:.0%}" if "bandwidth" in t["name"] else f">= {t['goal']:g}x"
    L.append(f"- {t['name']} at {t['where']}: {val} (goal {goal}; {t['detail']}): {verdict}.")
  L += ["", "## How it was measured", "", "Timing: " + " ".join((HERE / "KERNELS.md").read_text().split("Timing:", 1)[1].split())]
  if doc["notes"]:
    L += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
  kept = "\n"
  if md_path.exists() and KEEP in md_path.read_text():
    kept = md_path.read_text().split(KEEP, 1)[1]
  L += ["", KEEP + kept.rstrip("\n")]
  return "\n".join(L) + "\n"


def timer_name(doc: dict) -> str:
  timers = {m.get("timer") for c in doc["cases"].values() if isinstance(c, dict)
            for m in [c.get("kernel", {})] + list(c.get("inplace", {}).values()) if isinstance(m, dict)}
  timers.discard(None)
  return " / ".join(sorted(timers)) or "wall"


def plot(doc: dict, path: pathlib.Path):
  """Speedup against context, one line per retention: decode (the faster chunk path, and in place alone) and
  prefill."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  a = doc["args"]
  fig, (ax_d, ax_p) = plt.subplots(1, 2, figsize=(12, 4.6))
  colors = dict(zip(sorted(a["retentions"], reverse=True), ["tab:blue", "tab:green", "tab:orange", "tab:red",
                                                            "tab:purple", "tab:brown"]))
  for r in sorted(a["retentions"], reverse=True):
    pts = [(Lc, decode_summary(doc, Lc, r, a)) for Lc in a["contexts"]]
    pts = [(Lc, s) for Lc, s in pts if s and s["speedup"]]
    if pts:
      ax_d.plot([p[0] for p in pts], [p[1]["speedup"] for p in pts], "o-", color=colors[r],
                label=f"{r:.0%}, faster chunk path")
      ip = [(Lc, s["dense"]["time_s"] / s["ip"]["time_s"]) for Lc, s in pts if s["ip"]]
      if ip:
        ax_d.plot(*zip(*ip), "x:", color=colors[r], alpha=0.6, label=f"{r:.0%}, in place")
      ph = [(Lc, s["ph_speedup"]) for Lc, s in pts if s["ph_speedup"]]
      if ph:
        ax_d.plot(*zip(*ph), "s--", color=colors[r], alpha=0.8, label=f"{r:.0%}, per head (default rule)")
    for mode, style in zip(a["prefill_selection"], ("o-", "s--")):
      pts = [(T, prefill_summary(doc, T, r, mode)) for T in a["prefill_contexts"] or a["contexts"]]
      pts = [(T, s["speedup"]) for T, s in pts if s and s["speedup"]]
      if pts:
        ax_p.plot(*zip(*pts), style, color=colors[r], label=f"{r:.0%}, {mode if r < 1 else 'dense mode'}")
  kind = doc["device"]["kind"] + (" - SMOKE RUN, meaningless" if doc["smoke"] else "")
  for ax, what in ((ax_d, "decode: fastest dense / chunk"), (ax_p, "prefill: dense flash / chunk kernel")):
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(TARGET_SPEEDUP, color="tab:red", lw=0.8, ls=":", label=f"target {TARGET_SPEEDUP:g}x (128K, 25%)")
    ax.set_xscale("log", base=2)
    xs = sorted(set(a["contexts"]) | set(a["prefill_contexts"] or []))
    ax.set_xticks(xs, [f"{v // 1024}K" if v >= 1024 else str(v) for v in xs])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("speedup (higher is better)")
    ax.set_title(f"{what}\n{kind}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
