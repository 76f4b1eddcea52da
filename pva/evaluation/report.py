"""The evaluation's report: report.md (tables in the paper's format, the paper's own rows quoted
beside ours, and the protocol), report.json (every number) and grid.png (references / input /
results / ground truth)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..data.photos import read_photo
from ..files import write_atomically, write_json_atomically, write_text_atomically
from .cache import RunFolder
from .plan import IdentityPlan, square
from .scoring import Entry
from .settings import MASK_LABELS, METHOD_LABELS

# Xu et al., WACV 2024, Table 1: CelebAHQ-IDI-5, identity similarity with CosFace R100 (glint360k)
# against the ground truth, FID and KID x 1000 with clean-fid, SD2-inpainting at 512 px.
PAPER_ROWS = (
    ("Latent Diffusion", "-", 0.359, 8.24, 2.717),
    ("Paint by Example", "-", 0.430, 11.2, 6.089),
    ("MyStyle", "~15 min", 0.696, 27.7, 5.029),
    ("Textual Inversion", "~6 h", 0.644, 13.8, 8.404),
    ("Custom Diffusion", "~3 h", 0.729, 13.9, 5.870),
    ("PVA", "~1 min", 0.741, 8.22, 4.289),
)
PAPER_SOURCE = (
    "Xu et al., WACV 2024 (arXiv 2312.03556), Table 1: CelebAHQ-IDI-5 test identities; ID similarity = cosine "
    "of CosFace R100 (glint360k) features of result and ground truth; FID and KID x 1000 with clean-fid; "
    "SD2-inpainting at 512 px, DDIM 100 steps."
)


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    settings, identity, quality, text = (
        report["settings"],
        report["identity"],
        report["quality"],
        report["text"],
    )
    methods, masks = settings["methods"], settings["mask_types"]
    headline = report["headline_recognizer"]
    lines = [
        "# PVA evaluation",
        "",
        f"{report['dataset']}; split `{settings['split']}`: {report['identities']} identities, "
        f"{report['targets']} photos inpainted per mask type and method, up to {settings['references']} "
        "references per identity.",
        "",
        "## Main table (the paper's format)",
        "",
    ]
    if headline:
        lines.append(
            f"ID sim: {identity[headline]['label']}, mean over mask types ({', '.join(MASK_LABELS[m] for m in masks)}). "
            f"FID / KID x 1000: {report['features'] or 'not measured'}, mean over mask types."
        )
    lines += [
        "",
        "| method | fine-tune time | ID sim (↑) | FID (↓) | KID x 1000 (↓) |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        idsim = identity[headline]["methods"][method]["mean"] if headline else None
        row = quality.get(method, {})
        lines.append(
            f"| **ours: {METHOD_LABELS[method]}** | {report['finetune_time'].get(method, '-')} | {_num(idsim, 3)} | "
            f"{_num(row.get('mean_fid'), 2)} | {_num(row.get('mean_kid'), 3)} |"
        )
    for name, time, idsim, fid_value, kid_value in PAPER_ROWS:
        lines.append(f"| paper: {name} | {time} | {idsim:.3f} | {fid_value} | {kid_value:.3f} |")
    lines += ["", f"Paper rows: {PAPER_SOURCE} Our rows compare with them only when measured the same way "
              "(same data, recognizer, base model and resolution); see the protocol below.", ""]  # fmt: skip

    lines += ["## Identity similarity by mask type", ""]
    for table in identity.values():
        lines += [
            f"### {table['label']}",
            "",
            "| method | " + " | ".join(MASK_LABELS[m] for m in masks) + " | mean | results without a face |",
            "|---|" + "---|" * (len(masks) + 2),
        ]
        for method in methods:
            row = table["methods"][method]
            cells = [f"{_num(row[m]['mean'], 3)} ± {_num(row[m]['std'], 3)}" for m in masks]
            missed = sum(row[m]["missed"] for m in masks)
            lines.append(
                f"| {METHOD_LABELS[method]} | "
                + " | ".join(cells)
                + f" | {_num(row['mean'], 3)} | {missed} |"
            )
        if table["ground_truth_without_face"]:
            lines.append(
                f"\n{table['ground_truth_without_face']} ground-truth photos without a found face are left out."
            )
        lines.append("")

    if quality:
        lines += [
            "## Image quality by mask type (FID / KID x 1000 against the ground truth)",
            "",
            "| method | " + " | ".join(MASK_LABELS[m] for m in masks) + " |",
            "|---|" + "---|" * len(masks),
        ]
        for method in methods:
            row = quality[method]
            cells = [f"{_num(row[m]['fid'], 2)} / {_num(row[m]['kid'], 3)}" for m in masks]
            lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    if text:
        edits = settings["edits"]
        lines += [
            f'## Text control: CLIP score (cosine, {report["clip"] or "CLIP"}) on "{settings["prompt"]}, <edit>"',
            "",
            "| method | " + " | ".join(edits) + " | mean |",
            "|---|" + "---|" * (len(edits) + 1),
        ]
        for method in methods:
            row = text[method]
            lines.append(
                f"| {METHOD_LABELS[method]} | "
                + " | ".join(_num(row[e]["mean"], 3) for e in edits)
                + f" | {_num(row['mean'], 3)} |"
            )
        lines.append("")

    lines += ["## Protocol", ""]
    lines += [f"- {line}" for line in report["protocol"]]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    lines += ["", "![grid](grid.png)" if report.get("grid") else "", ""]
    return "\n".join(lines)


def protocol_lines(report: dict) -> list[str]:
    s = report["settings"]
    lines = [
        f"Faces: {report['face_location']}.",
        f"Targets centre-cropped to a square and resized to {s['resolution']} px; masks: "
        + ("the dataset's mask files" if report["dataset_masks"] else f"facial regions of the located face at precision {s['mask_precision']} (1 = box, as CelebAHQ-IDI's)")
        + ".",
        f"Sampling: ComfyUI {s['sampler']} / {s['scheduler']}, {s['steps']} steps, CFG {s['cfg']}, denoise 1.0, "
        f"prompt \"{s['prompt']}\", negative \"{s['negative_prompt']}\"; "
        + ("result pasted back through the mask." if s["paste_back"] else "the whole decoded image is the result."),
        f"Seeds: CRC32 of (seed {s['seed']}, identity, photo, mask type or edit): the same noise for every method.",
        f"PVA: strength {s['strength']}; identity tokens on the positive CFG branch (on both with an edit prompt), as the research code does.",
        f"Personalized: {s['personalization_steps']} quick-personalization steps on the references (AdamW, lr "
        f"{s['personalization_learning_rate']}, {s['personalization_time_bins']} time bins) starting from the given PVA model.",
        "Identity similarity: cosine of recognizer features of result and ground truth; a result whose face is not found scores 0.",
    ]  # fmt: skip
    for name, value in report["models"].items():
        lines.append(f"{name}: {value}")
    return lines


def write_grid(
    path: Path,
    folder: RunFolder,
    plans: dict[str, IdentityPlan],
    entries: list[Entry],
    settings: dict,
    size: int = 128,
) -> bool:
    """References (up to 3), the masked input, each method's result and the ground truth."""
    rows = [(e, m) for e in entries for m in settings["mask_types"]][: settings["grid_rows"]]
    if not rows:
        return False
    methods = settings["methods"]
    columns = ["ref 1", "ref 2", "ref 3", "input", *methods, "ground truth"]
    header, label_width = 20, 150
    canvas = Image.new("RGB", (label_width + size * len(columns), header + size * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, title in enumerate(columns):
        draw.text((label_width + c * size + 4, 4), title, fill="black", font=font)
    for r, (entry, mask_type) in enumerate(rows):
        y = header + r * size
        draw.text(
            (4, y + 4),
            f"{entry.person}\n{Path(entry.key).stem}\n{MASK_LABELS[mask_type]}",
            fill="black",
            font=font,
        )
        truth = folder.load_picture(folder.ground_truth(entry.person, entry.key))
        mask = folder.load_picture(folder.mask(entry.person, entry.key, mask_type))[..., :1]
        tiles = [square(read_photo(p.path), size) for p in plans[entry.person].references[:3]]
        tiles += [None] * (3 - len(tiles))
        tiles.append(truth * (1 - mask) + 0.5 * mask)
        tiles += [
            folder.load_picture(folder.picture("generations", m, entry.person, entry.key, mask_type))
            for m in methods
        ]
        tiles.append(truth)
        for c, tile in enumerate(tiles):
            if tile is not None:
                canvas.paste(_image(square(tile, size)), (label_width + c * size, y))
    write_atomically(path, lambda temp: canvas.save(temp, format="PNG"))
    return True


def _image(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray((pixels.clamp(0, 1) * 255).round().byte().numpy())


def write_report(folder: RunFolder, report: dict) -> None:
    write_json_atomically(folder.root / "report.json", report)
    write_text_atomically(folder.root / "report.md", markdown(report))
