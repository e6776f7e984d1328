"""Running the step3/step4 notebooks headless, and step4's report.html.

    python -m gbmpcnsl.notebooks NOTEBOOK OUT.ipynb [-p NAME VALUE ...] [--execution-timeout S]
        [--report OUT.html [--gradcam DIR]]

runs NOTEBOOK with papermill (each -p VALUE is read as JSON when it parses, else kept as
text, e.g. -p n_bootstraps 200 -p predictions '{"m": "p.csv"}' -p output_dir figs) and
writes the executed copy OUT.ipynb. The kernel talks to papermill over local IPC sockets
(in Jupyter's private runtime folder), not TCP: no port is opened, so ipykernel's warning
"Kernel is running over TCP without encryption" has no cause. --report writes one
self-contained HTML file from the executed copy with nbconvert: every output (tables,
figures as embedded PNGs), no code cells; --gradcam DIR adds a montage of the Grad-CAM
overlays step5 wrote to DIR. Exit status: 0 done, 2 bad arguments or a failed cell
(papermill's message).

Docs: docs/evaluation.md
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

from gbmpcnsl.cli import make_parser, positive_int
from gbmpcnsl.files import atomic_write

# The lab template without its scripts from CDNs (require.js, MathJax, Mermaid, widgets):
# the report opens offline, and nothing in it is loaded from elsewhere.
REPORT_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
MONTAGE_TILE = 192  # pixels per overlay in the Grad-CAM montage
MONTAGE_COLUMNS = 4
MONTAGE_MAX = 24  # overlays in the montage at most (the first, in path order)


def ipc_kernel_manager():
    """jupyter_client's AsyncKernelManager on IPC transport (imported when needed)."""
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"  # before the connection file (and socket paths) are made

    return IPCKernelManager


def run_notebook(notebook: Path, executed: Path, parameters: dict, cwd: Path | None = None, timeout=None):
    """Execute `notebook` with papermill into `executed` (kernel python3 over IPC); returns
    the executed notebook. A failing cell raises papermill's PapermillExecutionError."""
    import nbformat
    import papermill

    papermill.execute_notebook(
        str(notebook),
        str(executed),
        parameters=parameters,
        cwd=None if cwd is None else str(cwd),
        kernel_name="python3",
        progress_bar=False,
        execution_timeout=timeout,
        kernel_manager_class=ipc_kernel_manager(),
    )
    return nbformat.read(executed, as_version=4)


def gradcam_montage(folder: Path) -> bytes | None:
    """A PNG grid of the overlays under `folder` (step5's --output-dir, path order, at most
    MONTAGE_MAX), each captioned with its path; None when there are none."""
    from PIL import Image, ImageDraw

    overlays = sorted(path for path in folder.rglob("*.png") if path.is_file())[:MONTAGE_MAX]
    if not overlays:
        return None
    rows = -(-len(overlays) // MONTAGE_COLUMNS)
    caption = 14
    sheet = Image.new("RGB", (MONTAGE_COLUMNS * MONTAGE_TILE, rows * (MONTAGE_TILE + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, path in enumerate(overlays):
        x, y = (index % MONTAGE_COLUMNS) * MONTAGE_TILE, (index // MONTAGE_COLUMNS) * (MONTAGE_TILE + caption)
        with Image.open(path) as overlay:
            tile = overlay.convert("RGB")
            tile.thumbnail((MONTAGE_TILE, MONTAGE_TILE))
        sheet.paste(tile, (x + (MONTAGE_TILE - tile.width) // 2, y + caption))
        draw.text((x + 2, y + 1), path.relative_to(folder).as_posix()[-30:], fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def montage_cells(gradcam_dir: Path) -> list:
    """A heading and the montage as notebook cells (an output without input)."""
    import nbformat.v4 as v4

    png = gradcam_montage(gradcam_dir)
    if png is None:
        text = f"No Grad-CAM overlays (.png) under {gradcam_dir}."
        return [v4.new_markdown_cell(f"## Grad-CAM\n\n{text}")]
    heading = v4.new_markdown_cell(
        "## Grad-CAM\n\nstep5's overlays of test slices (red: the regions that raised the explained "
        "class's logit most), with their paths."
    )
    figure = v4.new_code_cell("# Grad-CAM montage (added by gbmpcnsl.notebooks)")
    figure.outputs = [
        v4.new_output("display_data", data={"image/png": base64.b64encode(png).decode("ascii")})
    ]
    return [heading, figure]


def write_report(executed: Path, html: Path, gradcam_dir: Path | None = None) -> Path:
    """report.html from the executed notebook: every output, no code cells, images embedded
    (data: URIs); with `gradcam_dir`, the Grad-CAM montage at the end. Written atomically."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    notebook = nbformat.read(executed, as_version=4)
    if gradcam_dir is not None:
        notebook.cells.extend(montage_cells(gradcam_dir))
    exporter = HTMLExporter(
        extra_loaders=[jinja2.DictLoader({"report.html.j2": REPORT_TEMPLATE})],
        template_file="report.html.j2",
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    body, _ = exporter.from_notebook_node(notebook)
    with atomic_write(html, private=True) as temporary:  # patients' images and predictions
        Path(temporary).write_text(body, encoding="utf-8")
    return html


def parameter_value(text: str):
    """-p's VALUE: JSON when it parses (numbers, lists, objects, null), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> int:
    """Run a notebook (and write its report); see the module docstring."""
    parser = make_parser("python -m gbmpcnsl.notebooks", __doc__)
    parser.add_argument("notebook", type=Path, metavar="NOTEBOOK")
    parser.add_argument("executed", type=Path, metavar="OUT.ipynb")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--execution-timeout", type=positive_int, metavar="S", help="seconds per cell")
    parser.add_argument("--report", type=Path, metavar="OUT.html", help="also write the HTML report")
    parser.add_argument("--gradcam", type=Path, metavar="DIR", help="with --report: step5's overlays")
    args = parser.parse_args(argv)
    if args.gradcam is not None and (args.report is None or not args.gradcam.is_dir()):
        parser.error(f"--gradcam {args.gradcam}: needs --report and an existing folder")
    from papermill.exceptions import PapermillExecutionError

    parameters = {name: parameter_value(value) for name, value in args.p}
    try:
        run_notebook(args.notebook, args.executed, parameters, timeout=args.execution_timeout)
    except (PapermillExecutionError, FileNotFoundError) as error:
        print(f"error: {args.notebook}: {str(error).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    if args.report is not None:
        print(write_report(args.executed, args.report, args.gradcam))
    return 0


if __name__ == "__main__":
    sys.exit(main())
