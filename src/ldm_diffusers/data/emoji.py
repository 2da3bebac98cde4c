"""The built-in dataset: Noto Color Emoji rendered to an imagefolder with captions and class labels.

Each emoji from ``emoji-test.txt`` (fully-qualified) that the Noto font draws as one glyph becomes
a ``resolution``x``resolution`` RGB PNG composited on white, with

* ``text``: the caption "an emoji of <name>" (e.g. "an emoji of grinning face"),
* ``group`` / ``group_id`` (9 classes) and ``subgroup`` / ``subgroup_id`` (about 99 classes),

in ``<root>/train`` and ``<root>/validation`` (a deterministic split by a hash of the name), each
with a ``metadata.jsonl``, so ``datasets.load_dataset("imagefolder", data_dir=root)`` loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..utils.model_files import atomic_directory, publish_directory

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")
INSTALL_HINT = "sudo apt-get install -y fonts-noto-color-emoji unicode-data"
# Noto Color Emoji is a bitmap font with one strike: 109 pt gives its native 136x128 glyphs.
NATIVE_SIZE = 109
CANVAS = 136
DATASET_VERSION = 1


@dataclass(frozen=True)
class EmojiEntry:
    codepoints: str
    char: str
    name: str
    group: str
    subgroup: str


def parse_emoji_test(path: str | os.PathLike = EMOJI_TEST_PATH) -> list[EmojiEntry]:
    """Fully-qualified emoji from Unicode's emoji-test.txt, with their group and subgroup."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' not found: it lists emoji names and groups. Install it with `{INSTALL_HINT}`.")
    entries, group, subgroup = [], None, None
    line_re = re.compile(r"^([0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*(\S+)\s+E\d+\.\d+\s+(.+)$")
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        else:
            match = line_re.match(line)
            if match and group and subgroup:
                entries.append(EmojiEntry(match.group(1), match.group(2), match.group(3).strip(), group, subgroup))
    if not entries:
        raise ValueError(f"No fully-qualified emoji found in '{path}'; is it Unicode's emoji-test.txt?")
    return entries


def _in_validation(name: str, validation_fraction: float) -> bool:
    digest = int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < validation_fraction


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def render_emoji_rgba(char: str, resolution: int, font=None):
    """One emoji as an RGBA PIL image of resolution x resolution on a transparent background; None if
    the font draws it as several glyphs (sequences it does not support)."""

    font = font or ImageFont.truetype(str(FONT_PATH), NATIVE_SIZE)
    if font.getlength(char) > 1.5 * CANVAS:
        return None
    canvas = Image.new("RGBA", (CANVAS, CANVAS), (255, 255, 255, 0))
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font, embedded_color=True)
    offset = ((CANVAS - (right - left)) // 2 - left, (CANVAS - (bottom - top)) // 2 - top)
    draw.text(offset, char, font=font, embedded_color=True)
    if canvas.getbbox() is None:
        return None
    return canvas.resize((resolution, resolution), Image.Resampling.LANCZOS)


def render_emoji(char: str, resolution: int, font=None):
    """One emoji as an RGB PIL image of resolution x resolution, composited on white; None if the
    font draws it as several glyphs (sequences it does not support)."""

    glyph = render_emoji_rgba(char, CANVAS, font)
    if glyph is None:
        return None
    white = Image.new("RGBA", glyph.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, glyph).convert("RGB")
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


def default_cache_dir() -> Path:
    root = os.environ.get("LDM_DIFFUSERS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ldm_diffusers"))
    return Path(root)


def already_built(output_dir: Path, info_name: str, settings: dict, overwrite: bool = False) -> bool:
    """Whether ``output_dir`` holds a build with these ``settings`` (recorded in its ``info_name`` JSON).
    Raises if the folder holds something else and ``overwrite`` is off."""
    if not output_dir.exists() or overwrite:
        return False
    info_file = output_dir / info_name
    if info_file.is_file() and json.loads(info_file.read_text()).get("settings") == settings:
        return True
    if any(output_dir.iterdir()):
        raise FileExistsError(
            f"'{output_dir}' exists but was built with other settings or by something else; "
            "pass overwrite=True (--overwrite) or choose another folder."
        )
    return False


def build_emoji_dataset(
    output_dir: str | os.PathLike | None = None,
    resolution: int = 64,
    validation_fraction: float = 0.1,
    include_skin_tones: bool = True,
    overwrite: bool = False,
    font_path: str | os.PathLike = FONT_PATH,
    emoji_test_path: str | os.PathLike = EMOJI_TEST_PATH,
) -> Path:
    """Render the emoji imagefolder (once; later calls with the same settings reuse it) and return its path."""

    if not Path(font_path).is_file():
        raise FileNotFoundError(f"Noto Color Emoji font not found at '{font_path}'. Install it with `{INSTALL_HINT}`.")
    settings = {
        "version": DATASET_VERSION,
        "resolution": resolution,
        "validation_fraction": validation_fraction,
        "include_skin_tones": include_skin_tones,
    }
    output_dir = Path(output_dir) if output_dir else default_cache_dir() / f"emoji-{resolution}"
    if already_built(output_dir, "dataset_info_ldm.json", settings, overwrite):
        return output_dir

    entries = parse_emoji_test(emoji_test_path)
    if not include_skin_tones:
        entries = [e for e in entries if "skin tone" not in e.name]
    groups = sorted({e.group for e in entries})
    subgroups = sorted({e.subgroup for e in entries})
    font = ImageFont.truetype(str(font_path), NATIVE_SIZE)

    tmp = atomic_directory(output_dir)
    counts = {"train": 0, "validation": 0}
    rows = {"train": [], "validation": []}
    for index, entry in enumerate(entries):
        image = render_emoji(entry.char, resolution, font)
        if image is None:
            continue
        split = "validation" if _in_validation(entry.name, validation_fraction) else "train"
        (tmp / split).mkdir(exist_ok=True)
        file_name = f"{index:04d}_{_slug(entry.name)}.png"
        image.save(tmp / split / file_name)
        counts[split] += 1
        rows[split].append(
            {
                "file_name": file_name,
                "text": f"an emoji of {entry.name}",
                "name": entry.name,
                "group": entry.group,
                "group_id": groups.index(entry.group),
                "subgroup": entry.subgroup,
                "subgroup_id": subgroups.index(entry.subgroup),
                "codepoints": entry.codepoints,
            }
        )
    for split, split_rows in rows.items():
        with open(tmp / split / "metadata.jsonl", "w", encoding="utf-8") as handle:
            for row in split_rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (tmp / "dataset_info_ldm.json").write_text(
        json.dumps({"settings": settings, "counts": counts, "groups": groups, "subgroups": subgroups}, indent=2)
    )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    publish_directory(tmp, output_dir)  # replaces an older build whole
    return output_dir


def load_emoji_dataset(resolution: int = 64, output_dir: str | os.PathLike | None = None, **kwargs):
    """Build (if needed) and load the emoji imagefolder as a ``datasets.DatasetDict`` (train, validation)."""
    from datasets import load_dataset

    root = build_emoji_dataset(output_dir, resolution=resolution, **kwargs)
    return load_dataset("imagefolder", data_dir=str(root))
