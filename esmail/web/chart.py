"""Messages per day as an inline SVG bar chart, stacked by outcome: no JavaScript, no image files, no library."""

from __future__ import annotations

from markupsafe import Markup, escape

COLOURS = {"stored": "#2f7d32", "quarantined": "#c77700", "failed": "#b3261e"}
WIDTH, HEIGHT, LABELS, TOP = 720, 140, 18, 16  # pixels: the plot, the strip under it for dates, the strip above for its scale


def daily_bars(days: list[dict]) -> Markup:
    """`days`: oldest first, each {"day": "2026-12-03", "stored": n, "quarantined": n, "failed": n}."""
    most = max((sum(day[state] for state in COLOURS) for day in days), default=0) or 1
    step = WIDTH / max(len(days), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 {-TOP} {WIDTH} {TOP + HEIGHT + LABELS}" '
             f'width="{WIDTH}" height="{TOP + HEIGHT + LABELS}"><title>Messages per day, last {len(days)} days (UTC)</title>']
    for n, day in enumerate(days):
        x, top = n * step + 1, HEIGHT
        summary = ", ".join(f"{day[state]} {state}" for state in COLOURS if day[state]) or "nothing"
        parts.append(f'<g class="day" data-day="{escape(day["day"])}"><title>{escape(day["day"])}: {escape(summary)}</title>')
        parts.append(f'<rect x="{x:.1f}" y="0" width="{step - 2:.1f}" height="{HEIGHT}" fill="#f3f3f3"/>')
        for state, colour in COLOURS.items():
            if day[state]:
                height = day[state] / most * (HEIGHT - 4)
                top -= height
                parts.append(f'<rect class="{state}" x="{x:.1f}" y="{top:.1f}" width="{step - 2:.1f}" height="{height:.1f}" fill="{colour}"/>')
        parts.append("</g>")
    labels = ((0, 1, "start"), (len(days) // 2, len(days) // 2 * step + step / 2, "middle"), (len(days) - 1, WIDTH - 1, "end"))
    for n, x, anchor in labels if days else ():  # the first and last dates kept inside the plot's edges
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT + 13}" font-size="11" text-anchor="{anchor}" fill="#555">'
                     f'{escape(days[n]["day"][5:])}</text>')
    parts.append(f'<text x="{WIDTH - 1}" y="-4" font-size="11" text-anchor="end" fill="#555">max {most} a day</text></svg>')
    return Markup("".join(parts))
