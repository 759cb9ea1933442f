"""The report job: evaluated runs in one Markdown table laid out like the thesis's Table 5.1, beside its numbers.

For every run (a workdir that ``--mode=evaluate`` has filled): the model in standard and thesis-compatible
metrics on the run's own corruption policy, the classical baselines, the thesis's row for the same setting, hours
per epoch on the machine that trained the run; then the model against the best baseline for every corruption
kind, and the figures.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from pathlib import Path
from typing import Optional, Sequence

from mrirecon_jax import corruptions, plots
from mrirecon_jax.config import Config, UserError
from mrirecon_jax.workdir import EVAL_DIR, RUN_POLICY, TOLD_MASK, Workdir, write_atomically

MARKER = "<!-- written by mrirecon-jax --mode=report -->"
THESIS_SLICES_PER_EPOCH = 23_715  # 465 training subjects x 51 slices: the thesis's "original" epoch
THESIS_POLICIES = {"patch+downsample": "original", "patch+oneof(downsample,gibbs,ghost)": "augmented"}
THESIS_SLAB_MM = {51: 48.0, 151: 142.0}  # 51 and 151 central slices of 0.94 mm IXI


@dataclasses.dataclass(frozen=True)
class ThesisRow:
    """One row of the thesis's Tables 5.1-5.3 (its own metric definitions; h/epoch on its three devices)."""

    table: str  # where the thesis gives it
    image_size: int
    data: str  # original | augmented
    slices: int  # central slices per volume
    ssim: tuple  # (slices, patches)
    psnr: tuple = (None, None)
    mse: tuple = (None, None)
    hours: tuple = (None, None, None)  # (discrete GPU, integrated GPU, CPU)
    subjects: int = 581  # 100 in the reduced scenario
    plane: str = "axial"

    @property
    def epoch_slices(self) -> int:
        """Training slices in one of its epochs: 80 % of the subjects x slices, three copies when augmented."""
        train_subjects = 465 if self.subjects == 581 else round(0.8 * self.subjects)
        return train_subjects * self.slices * (3 if self.data == "augmented" else 1)


THESIS_ROWS = (
    ThesisRow("Table 5.1", 64, "original", 51, (0.85, 0.57), (46.2, 42.6), (2.3e-8, 5.6e-6), (0.23, 16.43, 14.61)),
    ThesisRow("Table 5.1", 64, "original", 151, (0.60, 0.37), (41.2, 41.3), (1.7e-5, 2.5e-5), (1.08, None, None)),
    ThesisRow("Table 5.1", 64, "augmented", 51, (0.91, 0.65), (50.01, 43.66), (8.2e-7, 9e-6), (0.98, 47.91, 38.13)),
    ThesisRow("Table 5.1", 64, "augmented", 151, (0.77, 0.56), (41.2, 40.9), (9.9e-5, 9e-5), (2.97, 145.97, 116.77)),
    ThesisRow("Table 5.2", 32, "original", 51, (0.66, 0.40), (38.8, 38.6), (2.4e-6, 2.7e-5), (0.14, 3.37, 3.87)),
    ThesisRow("Table 5.2", 32, "original", 151, (0.58, 0.34), (39.74, 40.91), (1.8e-5, 1.9e-5), (0.26, None, None)),
    ThesisRow("Table 5.2", 32, "augmented", 51, (0.88, 0.65), (44.4, 41.3), (8.3e-6, 1.6e-5), (0.28, 13.15, 15.17)),
    ThesisRow("Table 5.2", 32, "augmented", 151, (0.85, 0.61), (44.4, 43.8), (1.3e-5, 1.2e-5), (0.58, 38.92, 44.91)),
    ThesisRow("Table 5.3", 128, "original", 51, (0.89, 0.55), (48.4, 42.8), (4.7e-7, 1.3e-5), (0.14, None, None), 100),
    ThesisRow("Table 5.3", 64, "original", 51, (0.80, 0.47), (44.0, 40.32), (6.3e-6, 7.5e-5), (0.03, 3.06, 2.94), 100),
    ThesisRow("Table 5.3", 32, "original", 51, (0.59, 0.36), (39.8, 37.93), (2.7e-6, 6.8e-5), (0.02, 0.62, 0.67), 100),
    ThesisRow("§5.3.3", 64, "original", 51, (0.74, 0.43), subjects=100, plane="sagittal"),  # its text: SSIM only
    ThesisRow("§5.3.3", 64, "original", 51, (0.70, 0.40), subjects=100, plane="coronal"),
)


def thesis_row_for(cfg: Config) -> Optional[ThesisRow]:
    """The thesis's row for the same image size, plane, corruptions, slab and number of subjects, if any."""
    data = THESIS_POLICIES.get(_canonical_policy(cfg.eval_policy))
    subjects = 100 if cfg.max_subjects == 100 else 581
    cfg = cfg.for_validation()  # the slab the run is measured on
    for row in THESIS_ROWS:
        same_slab = (cfg.slices == row.slices if cfg.slab_mm is None
                     else abs(cfg.slab_mm - THESIS_SLAB_MM[row.slices]) <= 3.0)
        if (row.image_size, row.plane, row.data, row.subjects) == (cfg.image_size, cfg.plane, data, subjects) \
                and same_slab:
            return row
    return None


def _canonical_policy(spec: str) -> str:
    try:
        return corruptions.parse_policy(spec).spec
    except ValueError:
        return spec


def seconds_per_training_slice(records: Sequence[dict], batch_size: int) -> Optional[float]:
    """Median training seconds per slice between consecutive validations (wall_time_s, steps x batch size).

    The first validation's interval holds compilation, so it is used only when it is the only one.
    """
    intervals = [(cur["wall_time_s"] - prev["wall_time_s"], cur["step"] - prev["step"])
                 for prev, cur in zip(records, records[1:])]
    intervals = [(s, n) for s, n in intervals if n > 0] or [(r["wall_time_s"], r["step"]) for r in records[:1]]
    rates = [s / (n * batch_size) for s, n in intervals if n > 0]
    return statistics.median(rates) if rates else None


def _fmt(value, kind: str) -> str:
    if value is None:
        return "–"
    return {"ssim": f"{value:.3f}", "psnr": f"{value:.2f}", "mse": f"{value:.2g}", "h": f"{value:.3g}"}[kind]


def _metric_cells(values: dict) -> list[str]:
    return [_fmt(values.get(f"{m}_{part}"), m) for m in ("ssim", "psnr", "mse") for part in ("slice", "patch")]


@dataclasses.dataclass(frozen=True)
class _Run:
    label: str
    work: Workdir
    cfg: Config
    split: dict
    records: list
    evaluation: dict


def _read_run(workdir: str) -> _Run:
    work = Workdir(workdir)
    evaluation = work.read_evaluation()
    return _Run(str(workdir), work, work.read_config(), work.read_split(), work.read_metrics(), evaluation)


def _main_rows(run: _Run) -> list[str]:
    """Table 5.1 rows of one run: model (standard, thesis-compatible), baselines, the thesis's row."""
    own = run.evaluation["kinds"][RUN_POLICY]
    per_volume = run.evaluation["n_slices"] / max(run.evaluation["n_subjects"], 1)
    measured = run.cfg.for_validation()
    slices = f"{per_volume:g}" + (f" ({measured.slab_mm:g} mm)" if measured.slab_mm else "")
    data = (f"{THESIS_POLICIES.get(own['policy'], own['policy'])}; {run.evaluation['n_subjects']} subjects, "
            f"{run.evaluation['n_slices']} slices ({run.evaluation['subjects']})")
    thesis = thesis_row_for(run.cfg)
    per_slice = seconds_per_training_slice(run.records, run.cfg.batch_size)
    thesis_epoch = thesis.epoch_slices if thesis else THESIS_SLICES_PER_EPOCH
    hours = None if per_slice is None else per_slice * thesis_epoch / 3600
    with_compilation = "; includes compilation" if _one_interval(run.records) else ""
    hours_cell = f"{_fmt(hours, 'h')} ({_devices(run)}, {thesis_epoch:,} slices{with_compilation})"
    name = f"**{run.label}** step {run.evaluation['checkpoint_step']}"
    rows = [
        [f"{name}: model", data, slices, *_metric_cells(own), hours_cell],
        [f"{name}: model, thesis-compatible", "″", "″", *_metric_cells(own["thesis_compat"]), ""],
    ]
    if TOLD_MASK in own:
        rows += [[f"{name}: model told the patch's mask", "″", "″", *_metric_cells(own[TOLD_MASK]), ""],
                 [f"{name}: model told the mask, thesis-compatible", "″", "″",
                  *_metric_cells(own[TOLD_MASK]["thesis_compat"]), ""]]
    for base, values in own["baselines"].items():
        best = " (best)" if base == own["best_baseline"] else ""
        rows.append([f"{name}: baseline {base}{best}", "″", "″", *_metric_cells(values), ""])
    if thesis is not None:
        h_dgpu, h_igpu, h_cpu = (_fmt(h, "h") for h in thesis.hours)
        cells = [_fmt(v, m) for m, pair in (("ssim", thesis.ssim), ("psnr", thesis.psnr), ("mse", thesis.mse))
                 for v in pair]
        rows.append([f"thesis {thesis.table} ({thesis.image_size} px, {thesis.plane})",
                     f"{thesis.data}; {thesis.subjects} subjects", str(thesis.slices), *cells,
                     f"{h_dgpu} dGPU / {h_igpu} iGPU / {h_cpu} CPU ({thesis.epoch_slices:,} slices)"])
    else:
        rows.append(["thesis: no row for this setting", "", "", *[""] * 6, ""])
    return ["| " + " | ".join(row) + " |" for row in rows]


def _one_interval(records: Sequence[dict]) -> bool:
    """Whether the rate has only the first validation's interval, which holds compilation, to go by."""
    return not any(cur["step"] > prev["step"] for prev, cur in zip(records, records[1:]))


def _devices(run: _Run) -> str:
    """The devices the run trained on, as its metrics records name them (several if it resumed elsewhere)."""
    found = list(dict.fromkeys(r["device"] for r in run.records if r.get("device")))
    return " + ".join(found) or "device not recorded"


def _kind_rows(run: _Run) -> list[str]:
    rows = []
    for kind, entry in run.evaluation["kinds"].items():
        best = entry["best_baseline"]
        base = entry["baselines"][best]
        gain = None if entry["ssim_slice"] is None else entry["ssim_slice"] - base["ssim_slice"]
        rows.append([run.label, kind, f"`{entry['policy']}`", _fmt(entry["ssim_slice"], "ssim"),
                     _fmt(entry["ssim_patch"], "ssim"), _fmt(entry["psnr_slice"], "psnr"), best,
                     _fmt(base["ssim_slice"], "ssim"), _fmt(base["ssim_patch"], "ssim"),
                     _fmt(base["psnr_slice"], "psnr"),
                     "–" if gain is None else f"{gain:+.3f}"])
    return ["| " + " | ".join(row) + " |" for row in rows]


def _figures(run: _Run, output_dir: Path) -> list[str]:
    lines = [f"### {run.label}", ""]
    for path in run.work.figures(EVAL_DIR):
        link = os.path.relpath(path.absolute(), output_dir.absolute())
        lines.append(f"- [{path.stem.replace('_', ' ')}]({link})")
    return lines + [""]


def _time_figure(runs: Sequence[_Run], output: Path) -> list[str]:
    """The runs' validation SSIM against training minutes, beside the thesis's best epochs for their settings;
    drawn beside the report as <report>_ssim_vs_time.png."""
    path = output.with_name(f"{output.stem}_ssim_vs_time.png")
    references = {(row.table, row.image_size, row.data, row.slices, row.plane, row.subjects): row
                  for row in (thesis_row_for(run.cfg) for run in runs) if row is not None}
    plots.save_runs_vs_time(path, [(Path(run.label).name, run.records) for run in runs],  # legend: folder names
                            [(f"thesis {row.table} {row.image_size} px {row.data}, best epoch", *row.ssim)
                             for row in references.values()])
    return [f"![validation SSIM against training time]({path.name})", "",
            "Validation SSIM of every run against its training minutes on the machine that trained it (standard "
            "2-D SSIM left; the thesis's own metric right, beside the thesis's best epoch, dotted).", ""]


def write_report(workdirs: Sequence[str], output) -> Path:
    """Write the Markdown report of the evaluated runs in `workdirs` to `output` (and its SSIM-against-time
    figure beside it); return its path."""
    output = Path(output)
    if output.exists() and not (output.is_file() and output.read_text(errors="replace").startswith(MARKER)):
        raise UserError(f"{output} exists and is not a report written by --mode=report; choose another --output.")
    runs = [_read_run(w) for w in workdirs]
    output.parent.mkdir(parents=True, exist_ok=True)
    per_slice_note = (
        "h/epoch: the run's median training seconds per slice (from `wall_time_s` in its metrics.jsonl, "
        "compilation excluded unless the run validated only once) times the slices of the thesis's epoch for that "
        "setting (80 % of its subjects x slices, x3 for its augmented set; "
        f"{THESIS_SLICES_PER_EPOCH:,} for the original 51-slice set).")
    own_epochs = "; ".join(
        f"{r.label}: {r.split.get('n_train_slices', '?')} training slices per epoch, "
        f"{_fmt(_own_hours(r), 'h')} h per own epoch, {r.records[-1]['epoch']:g} epochs in "
        f"{r.records[-1]['wall_time_s'] / 60:.1f} min of training on {_devices(r)}" for r in runs)
    header = ("| run | data | slices | SSIM slices | SSIM patches | PSNR slices | PSNR patches | MSE slices | "
              "MSE patches | h/epoch |")
    lines = [
        MARKER, "# Evaluation report", "",
        "Layout of the thesis's Table 5.1. Our rows use standard definitions (2-D SSIM as scikit-image, data range "
        "1; MSE = mean squared error; PSNR with peak 1) and, in the thesis-compatible row, the thesis's own "
        "(SSIM of the flattened slice with the prediction's data range; \"MSE\" = the square of the mean error), "
        "which are the ones to hold against its rows. Patch values: the rectangle around each patch. Each run "
        "is evaluated on its own corruption policy; baselines see the very same corrupted inputs.", "",
        header, "|" + "---|" * 10, *[line for run in runs for line in _main_rows(run)], "",
        per_slice_note, f"The runs' own epochs: {own_epochs}.", "",
        "## Model against the best baseline, per corruption kind", "",
        "Each catalogue kind is evaluated as `patch+KIND`; `run_policy` is the run's own policy; `overall` pools "
        "the catalogue kinds. Best baseline: highest slice SSIM among the baselines below.", "",
        "| run | kind | policy | model SSIM slices | model SSIM patches | model PSNR slices | best baseline | "
        "baseline SSIM slices | baseline SSIM patches | baseline PSNR slices | SSIM gain |",
        "|" + "---|" * 11, *[line for run in runs for line in _kind_rows(run)], "",
        "Baselines: " + "; ".join(f"`{k}`: {v}" for k, v in runs[0].evaluation["baseline_definitions"].items())
        + ".", "",
        "## Quality against training time", "",
        *_time_figure(runs, output),
        "## Figures", "",
        *[line for run in runs for line in _figures(run, output.parent)],
    ]
    text = "\n".join(lines) + "\n"
    write_atomically(output, lambda temp: Path(temp).write_text(text))
    return output


def _own_hours(run: _Run) -> Optional[float]:
    per_slice = seconds_per_training_slice(run.records, run.cfg.batch_size)
    slices = run.split.get("n_train_slices")
    return None if per_slice is None or slices is None else per_slice * slices / 3600
