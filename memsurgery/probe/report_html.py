"""report.html: one self-contained page (inline CSS, SVG charts and a little inline JS; no external
reference), in the order a reader needs it: the result, the training curve, the samples
(filterable, base beside trained), then the details. The data comes from report.py."""

from __future__ import annotations

from html import escape

from memsurgery.probe import svg
from memsurgery.probe.sections import (
    MAX_SAMPLE_ROWS,
    PER_LAYER_TITLE,
    abstention_sentence,
    delta_good,
    display_name,
    first_summary,
    fmt_delta,
    fmt_value,
    headline,
    num,
    paired_samples,
    summary_rows,
    tables,
)

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1040px;
 padding:0 16px;color:#222;line-height:1.4}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#555;font-size:13px;margin:0 0 12px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;
 text-align:left;vertical-align:top;max-width:380px;overflow-wrap:anywhere}th{background:#f3f3f3}
.result{border:2px solid #4C72B0;border-radius:6px;padding:10px 16px;background:#f7f9fd}
.result p{margin:6px 0}.result table td.num,.result table th.num{text-align:right}
.good{color:#1a7f37;font-weight:600}.bad{color:#c0392b;font-weight:600}
.what{color:#666;font-size:12px}
.abst{border-left:4px solid #DD8452;padding:4px 10px;background:#fff8f2}
figure{margin:12px 0}figcaption{font-weight:600;font-size:14px;margin-bottom:4px}
figcaption .note{font-weight:400;color:#555;font-size:12px;display:block}
svg{display:block;max-width:100%;height:auto}
.g-CORRECT{background:#e6f4ea}.g-INCORRECT{background:#fdecea}.g-NOT_ATTEMPTED{background:#f0f0f0}
.badge{font-size:11px;padding:0 4px;border-radius:3px;white-space:nowrap}
#filters{display:flex;flex-wrap:wrap;gap:8px;align-items:center;font-size:13px;margin:6px 0}
#filters button{font-size:12px;padding:2px 8px}
td.gen{max-width:260px}td.prompt{max-width:320px}
.curves{display:flex;flex-wrap:wrap;gap:12px}.curves figure{flex:0 1 auto}
"""

_JS = """
(function(){
 var rows=Array.prototype.slice.call(document.querySelectorAll('#sample-table tbody tr'));
 var kind=document.getElementById('f-kind'),grade=document.getElementById('f-grade'),
     vs=document.getElementById('f-vs'),q=document.getElementById('f-q'),
     count=document.getElementById('f-count'),more=document.getElementById('f-more');
 var limit=100;
 function match(r){
  if(kind.value&&r.dataset.kind!==kind.value)return false;
  if(grade.value==='WRONG'){if(r.dataset.grade==='CORRECT')return false;}
  else if(grade.value&&r.dataset.grade!==grade.value)return false;
  if(vs.value&&r.dataset.vs!==vs.value)return false;
  if(q.value&&r.textContent.toLowerCase().indexOf(q.value.toLowerCase())<0)return false;
  return true;}
 function apply(){var shown=0,matched=0;
  rows.forEach(function(r){var ok=match(r);if(ok)matched++;var vis=ok&&shown<limit;if(vis)shown++;
   r.style.display=vis?'':'none';});
  count.textContent='showing '+shown+' of '+matched+' matching ('+rows.length+' in the table)';
  more.style.display=matched>shown?'':'none';}
 [kind,grade,vs].forEach(function(e){e.addEventListener('change',function(){limit=100;apply();});});
 q.addEventListener('input',function(){limit=100;apply();});
 more.addEventListener('click',function(){limit+=200;apply();});
 Array.prototype.forEach.call(document.querySelectorAll('#filters button[data-kind]'),function(b){
  b.addEventListener('click',function(){kind.value=b.dataset.kind;grade.value=b.dataset.grade;vs.value='';
   q.value='';limit=100;apply();});});
 // report.html#samples?kind=unknown&grade=INCORRECT opens with that filter (links, tests)
 var h=location.hash.split('?');
 if(h[0]==='#samples'&&h[1]){h[1].split('&').forEach(function(kv){var p=kv.split('='),
  el={kind:kind,grade:grade,vs:vs,q:q}[p[0]];if(el)el.value=decodeURIComponent(p[1]||'');});}
 apply();
})();
"""


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    return (f"<table{f' class={cls!r}' if cls else ''}><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header)
            + "</tr>" + "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>")


def _result_section(report: dict) -> str:
    base = bool(report.get("baseline"))
    parts = ['<section class="result" id="result"><h2 style="border:0;margin-top:4px">Result</h2>']
    text = headline(report)
    if text:
        parts.append(f"<p>{escape(text)}</p>")
    rows = summary_rows(report)
    if rows:
        head = "<tr><th></th><th class='num'>n</th>" + ("<th class='num'>base</th>" if base else "") + \
            "<th class='num'>trained</th>" + ("<th class='num'>change</th>" if base else "") + "</tr>"
        body = []
        for r in rows:
            good = delta_good(r)
            cls = "" if good is None else ("good" if good else "bad")
            label = escape(r["label"].strip())
            label = f"&nbsp;&nbsp;&nbsp;{label}" if r["label"].startswith("  ") else f"<b>{label}</b>"
            what = f' <span class="what">{escape(r["what"])}</span>' if r["what"] else ""
            body.append(f"<tr><td>{label}{what}</td><td class='num'>{'' if r['n'] is None else r['n']}</td>"
                        + (f"<td class='num'>{fmt_value(r['base'], r['kind'])}</td>" if base else "")
                        + f"<td class='num'><b>{fmt_value(r['model'], r['kind'])}</b></td>"
                        + (f"<td class='num {cls}'>{escape(fmt_delta(r))}</td>" if base else "") + "</tr>")
        parts.append("<table>" + head + "".join(body) + "</table>")
    ab = abstention_sentence(report)
    if ab:
        parts.append(f'<p class="abst"><b>Abstention.</b> {escape(ab)}</p>')
    if not report.get("baseline"):
        parts.append('<p class="what">No base model was probed beside this one (probe --baseline): '
                     'changes are not shown.</p>')
    parts.append("</section>")
    return "".join(parts)


def _training_section(report: dict) -> str:
    curve = report.get("training")
    if not curve:
        return ""
    note = (f"{curve['n_steps']} steps, from {curve['run_dir']}/{curve['metrics']}; thin line: loss per step, "
            "thick line: moving average")
    if curve.get("eval_loss"):
        note += f"; last held-out loss {curve['eval_loss'][-1]:.4f} at step {curve['eval_steps'][-1]}"
    charts = [svg.line_chart("Training loss", curve["steps"], {"loss": curve["loss"],
                                                             "moving average": curve["loss_smoothed"]},
                             width=500, y_label="loss", note=note, widths={"loss": 0.8, "moving average": 2.2})]
    if any(v is not None for v in curve.get("slots_touched") or []):
        charts.append(svg.line_chart("Value-table rows touched per step", curve["steps"],
                                     {"slots touched": curve["slots_touched"]}, width=500, y_label="rows",
                                     note="rows of the shared value table that received a gradient"))
    return '<h2 id="training">Training</h2><div class="curves">' + "".join(charts) + "</div>"


def _vs(r: dict) -> str:
    if r["base_grade"] is None:
        return "nobase"
    if r["base_grade"] != "CORRECT" and r["grade"] == "CORRECT":
        return "fixed"
    if r["base_grade"] == "CORRECT" and r["grade"] != "CORRECT":
        return "broke"
    return "same" if r["generation"] == r["base_generation"] else "changed"


def _badge(grade: str | None) -> str:
    return "" if grade is None else f'<span class="badge g-{escape(grade)}">{escape(grade.lower().replace("_", " "))}</span>'


def _samples_section(samples: list[dict]) -> str:
    pairs = paired_samples(samples)
    if not pairs:
        return ""
    shown = pairs[:MAX_SAMPLE_ROWS]
    has_base = any(r["base_grade"] is not None for r in shown)
    kinds = sorted({r["kind"] for r in shown})
    opts = lambda vals: "".join(f'<option value="{escape(v)}">{escape(t)}</option>' for v, t in vals)  # noqa: E731
    presets = [("hallucinations", "unknown", "INCORRECT"), ("injected errors", "injected", "WRONG"),
               ("known-fact errors", "known", "WRONG"), ("everything", "", "")]
    controls = (
        '<div id="filters">'
        + "".join(f'<button data-kind="{k}" data-grade="{g}">{t}</button>' for t, k, g in presets)
        + f'<label>kind <select id="f-kind">{opts([("", "all")] + [(k, k) for k in kinds])}</select></label>'
        + '<label>grade <select id="f-grade">' + opts([("", "all"), ("CORRECT", "correct"), ("WRONG", "not correct"),
                                                       ("INCORRECT", "incorrect"), ("NOT_ATTEMPTED", "not attempted")])
        + "</select></label>"
        + ('<label>vs base <select id="f-vs">' + opts([("", "any"), ("fixed", "base wrong, trained right"),
                                                        ("broke", "base right, trained wrong"),
                                                        ("changed", "answer changed"), ("same", "same answer")])
           + "</select></label>" if has_base else '<select id="f-vs" hidden><option value=""></option></select>')
        + '<label>search <input id="f-q" size="16"></label><span id="f-count"></span></div>')
    head = ("<tr><th>kind</th><th>phrasing</th><th>prompt</th><th>expected</th><th>trained answer</th>"
            + ("<th>base answer</th>" if has_base else "") + "</tr>")
    body = []
    for r in shown:
        body.append(
            f'<tr data-kind="{escape(r["kind"])}" data-grade="{escape(r["grade"])}" data-vs="{_vs(r)}">'
            f'<td>{escape(r["kind"])}<br><span class="what">{escape(r["relation"])}</span></td>'
            f'<td class="what">{escape(r["phrasing"])}</td><td class="prompt">{escape(r["prompt"])}</td>'
            f'<td>{escape(" | ".join(r["answers"]))}</td>'
            f'<td class="gen g-{escape(r["grade"])}">{escape(r["generation"])} {_badge(r["grade"])}</td>'
            + (f'<td class="gen g-{escape(r["base_grade"] or "")}">{escape(r["base_generation"] or "")} '
               f'{_badge(r["base_grade"])}</td>' if has_base else "") + "</tr>")
    note = (f"{len(pairs)} prompts" + (f", the first {len(shown)} here" if len(shown) < len(pairs) else "")
            + "; every prompt and generation of both models is in samples.jsonl. Grades: correct (exact match), "
              "incorrect (answered, wrong), not attempted (abstained).")
    return (f'<h2 id="samples">Samples</h2><p class="sub">{escape(note)}</p>{controls}'
            f'<table id="sample-table"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'
            '<button id="f-more">show more</button>')


def _accuracy_chart(report: dict) -> str:
    tmpl = next(iter(report["summary"]))
    summ = first_summary(report)
    labels = list(summ["kinds"]) + list(summ["relations"])
    series = {"trained": [summ["kinds"][k]["exact_match"] for k in summ["kinds"]]
              + [summ["relations"][k]["exact_match"] for k in summ["relations"]]}
    if report.get("baseline"):
        b = report["baseline"]["summary"].get(tmpl, {"kinds": {}, "relations": {}})
        series = {"base": [(b["kinds"].get(k) or {}).get("exact_match") for k in summ["kinds"]]
                  + [(b["relations"].get(k) or {}).get("exact_match") for k in summ["relations"]], **series}
    return svg.hbar_chart(f"Exact match by kind and relation (template {tmpl})", labels, series)


def _signal_chart(report: dict, samples: list[dict]) -> str:
    """The strip plot of the signal the abstention uses (the others are in the signals table)."""
    sig = report.get("signals")
    if not sig:
        return ""
    name = (sig.get("abstention") or {}).get("signal") or sig.get("primary")
    rows = [s for s in samples if s.get("model") != "baseline" and name in (s.get("signals") or {})]
    groups = {k: [s["signals"][name] for s in rows if s["kind"] == k] for k in ("known", "injected", "unknown")}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return ""
    au = (sig["signals"].get(name) or {}).get("auroc_injected_vs_unknown")
    thr = (sig.get("abstention") or {}).get("threshold")
    title = f"Memory signal {name} by kind (the one abstention uses; AUROC injected vs unknown {num(au)})"
    return svg.strip_plot(title, groups, x_label=name + (" (black bars: means)"),
                          marker=(thr, f"abstain below {thr:.4g}") if thr is not None else None)


def _detail_charts(report: dict, samples: list[dict]) -> dict[str, list[str]]:
    """Charts keyed by the title prefix of the detail table they go with (before it, or after: "+")."""
    curves = {"trained": report["calibration"]["bins"]}
    if report.get("baseline"):
        curves = {"base": report["baseline"]["calibration"]["bins"], **curves}
    hists = [svg.column_chart(f"Layer {L}, {set_name}", h["edges"], h["slots"], width=330, height=170,
                              log_y=True, x_label="accesses (0 = never read)", y_label="slots")
             for set_name, layers in (report.get("telemetry") or {}).items()
             for L, h in ((L, st["histogram"]) for L, st in layers.items())]
    signal = _signal_chart(report, samples)
    return {
        "Accuracy by kind": [_accuracy_chart(report)],
        "+Hallucination, calibration": [svg.reliability_diagram("Calibration: accuracy vs confidence", curves)],
        "Memory signals:": [signal] if signal else [],
        "+Memory telemetry": (['<p class="sub"><b>Slots by access count</b> on the probe\'s prompts, per memory '
                               'layer and fact set (log scale)</p><div class="curves">' + "".join(hists) + "</div>"]
                              if hists else []),
    }


def render_html(report: dict, samples: list[dict]) -> str:
    m = report["model"]
    title = f"memsurgery probe: {display_name(m.get('path'))}"
    sets = ", ".join(f"{k} ({v})" for k, v in report["fact_sets"].items())
    parts = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>Probe report: {escape(display_name(m.get('path')))}</h1>",
             f'<p class="sub">Trained: <code>{escape(display_name(m.get("path")))}</code>'
             + (f' &middot; base: <code>{escape(display_name(report["baseline"]["model"].get("path")))}</code>'
                if report.get("baseline") else "")
             + f" &middot; grafted: {report['grafted']} &middot; fact sets: {escape(sets)}</p>",
             _result_section(report), _training_section(report), _samples_section(samples),
             '<h2 id="details">Details</h2>']
    charts = _detail_charts(report, samples)
    for title_, header, rows in tables(report):
        before = [c for key, cs in charts.items() if title_.startswith(key) for c in cs]
        after = [c for key, cs in charts.items() if key.startswith("+") and title_.startswith(key[1:]) for c in cs]
        table = f"<h3>{escape(title_)}</h3>" + _table(header, rows)
        if title_ == PER_LAYER_TITLE:  # dozens of rows: folded
            table = f"<details><summary>{escape(title_)} ({len(rows)} rows)</summary>{_table(header, rows)}</details>"
        parts += before + [table] + after
    parts.append("<p class=\"sub\">Definitions of every metric: docs/probe.md in the memsurgery repository.</p>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(p for p in parts if p)

