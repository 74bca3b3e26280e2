"""Messages per day as an inline SVG bar chart, stacked by outcome: no JavaScript, no image files, no library.

Drawn in its own units and scaled to the page's width (esmail.css). A day
with a failed or quarantined message always shows it (a bar of at least
MIN_BAR), the scale is on the left with its grid, each day's total is
written over its bar, and today, not over yet, is drawn paler and outlined.
"""

from __future__ import annotations

from markupsafe import Markup, escape

COLOURS = {"stored": "#2f7d32", "quarantined": "#c77700", "failed": "#b3261e"}
WIDTH, HEIGHT, LABELS, TOP, LEFT = 720, 140, 18, 18, 30  # units: the whole, the plot, dates under it, totals over it, the scale
MIN_BAR = 3  # units: the least height of a part that is not zero


def scale_top(most: int) -> int:
    """The top of the scale: the first of 1, 2, 5, 10, 20, 50, … at or over `most`."""
    top = 1
    while top < most:
        top = top * 5 // 2 if str(top)[0] == "2" else top * 2
    return top


def daily_bars(days: list[dict]) -> Markup:
    """`days`: oldest first, each {"day": "2026-12-03", "stored": n, "quarantined": n, "failed": n}; the last is today."""
    most = max((sum(day[state] for state in COLOURS) for day in days), default=0)
    top = scale_top(most)
    plot = WIDTH - LEFT
    step = plot / max(len(days), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 {-TOP} {WIDTH} {TOP + HEIGHT + LABELS}" '
             f'width="{WIDTH}" height="{TOP + HEIGHT + LABELS}"><title>Messages per day, last {len(days)} days (UTC)</title>']
    for value in (0, top // 2, top) if top > 1 else (0, top):
        y = HEIGHT - value / top * HEIGHT
        parts.append(f'<line x1="{LEFT - 4}" x2="{WIDTH}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ccc" stroke-width="1"/>'
                     f'<text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" fill="#555">{value}</text>')
    for n, day in enumerate(days):
        today = n == len(days) - 1
        x, bottom = LEFT + n * step + 1, HEIGHT
        summary = ", ".join(f"{day[state]} {state}" for state in COLOURS if day[state]) or "nothing"
        pale = ' opacity="0.6"' if today else ""
        parts.append(f'<g class="day{" today" if today else ""}" data-day="{escape(day["day"])}"{pale}>'
                     f'<title>{escape(day["day"])}{" (today, so far)" if today else ""}: {escape(summary)}</title>')
        for state, colour in COLOURS.items():
            if day[state]:
                height = max(day[state] / top * HEIGHT, MIN_BAR)
                bottom -= height
                parts.append(f'<rect class="{state}" x="{x:.1f}" y="{bottom:.1f}" width="{step - 2:.1f}" height="{height:.1f}" fill="{colour}"/>')
        total = sum(day[state] for state in COLOURS)
        if total:
            parts.append(f'<text x="{x + (step - 2) / 2:.1f}" y="{bottom - 3:.1f}" font-size="10" text-anchor="middle" fill="#333">{total}</text>')
        if today:
            parts.append(f'<rect x="{x:.1f}" y="0" width="{step - 2:.1f}" height="{HEIGHT}" fill="none" stroke="#555" stroke-dasharray="3 2"/>')
        parts.append("</g>")
    labels = ((0, LEFT + 1, "start", None), (len(days) // 2, LEFT + len(days) // 2 * step + step / 2, "middle", None),
              (len(days) - 1, WIDTH - 1, "end", "today"))
    for n, x, anchor, text in labels if days else ():  # the first and last dates kept inside the picture's edges
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT + 13}" font-size="11" text-anchor="{anchor}" fill="#555">'
                     f'{escape(text or days[n]["day"][5:])}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
