"""Checking a training dataset before step 1: every file, every pair, every size, and the memory a batch needs.

Why before step 1: a damaged file found at hour three costs three hours, and a batch of two sizes used to stop in
`torch.stack` with "stack expects each tensor to be equal size", naming no file. So every image and condition is
opened once up front (its header, plus the chunk checksums of a PNG), every problem is collected, and one error
lists them all with their files. A truncated JPEG or PNG is found from its last bytes (`truncation`): OpenCV
decodes a cut JPEG with only a libjpeg warning, its lower part grey, and would train on it. Cost on 2 busy cores: 0.3 s for 1000 fill50k-like
pairs (64 or 512 px), 5 s for 1000 pairs of incompressible 512 px PNGs (0.8 MB each, read through once); reading
the same items for training took 0.6 s, 47 s and about 73 s.

Memory is bounded the same way the annotators bound theirs (annotators/base.py): in megapixels, per stored file
(decoded whole before it is resized), per training image and per batch, each limit changeable with an environment
variable. A resolution or batch size typed into a widget then stops with a message instead of the kernel's
out-of-memory killer ending the ComfyUI process.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ControlNetError, LimitExceededError
from ..limits import megapixel_limit

MAX_LISTED = 20  # problems named in one message; the rest are counted

# (environment variable, default in megapixels). Why these defaults: a stored file is decoded as 8-bit RGB before
# resizing (128 MP, a 108 MP phone photo with room, is 384 MB); one training image of 4.7 MP is a 2048 x 2048 bucket
# with the buckets' 10% area tolerance; a batch of 19 MP is 16 SDXL images at 1024 px (or 64 at 512 px) per process.
FILE_LIMIT = ("CNS_MAX_TRAIN_FILE_MEGAPIXELS", 128.0)
IMAGE_LIMIT = ("CNS_MAX_TRAIN_MEGAPIXELS", 4.7)
BATCH_LIMIT = ("CNS_MAX_TRAIN_BATCH_MEGAPIXELS", 19.0)


class DatasetError(ControlNetError):
    """A training folder that cannot be used as it is."""


def dataset_error(root: Path, problems: Sequence[tuple[Path, str]]) -> DatasetError:
    """One error naming every problem's file (the first MAX_LISTED; the rest counted), on one line, the problems
    separated by semicolons (so no problem's text holds one)."""
    root = Path(root)
    listed = "; ".join(f"{_rel(path, root)}: {what}" for path, what in problems[:MAX_LISTED])
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    noun = "problem" if len(problems) == 1 else "problems"
    return DatasetError(f"{root}: {len(problems)} {noun} in the training data, found before training started "
                        f"(fix, replace or remove these files, then start again): {listed}{more}.")


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def not_a_file(path: Path) -> Optional[str]:
    """What is wrong with a listed path that is no file, else None."""
    if Path(path).is_file():
        return None
    return "does not exist" if not Path(path).exists() else "is not a file"


# A JPEG starts with SOI (FF D8 FF) and ends with EOI (FF D9); a PNG starts with its signature and ends with the
# IEND chunk, always these 12 bytes: length 0, type "IEND", CRC AE 42 60 82 (PNG spec, section 11.2.5).
JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
PNG_START, PNG_END = b"\x89PNG\r\n\x1a\n", b"\x00\x00\x00\x00IEND\xaeB`\x82"


def truncation(path: Path) -> Optional[str]:
    """What is wrong with a JPEG or PNG whose data stops before its end marker, else None (also for other files).

    Exact and cheap: a complete file ends with its end marker (EOI, or the IEND chunk), so reading the last 12 bytes
    settles nearly every file. One that does not end so (a camera's or phone's data appended after the image, as in
    motion photos) is walked: JPEG segment lengths and entropy-coded data up to EOI (inside that data a 0xFF byte is
    always followed by 0x00 or a restart marker, so FF D9 there is the real EOI), PNG chunk lengths up to IEND. Only
    a file with no end marker at all is reported."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = f.seek(0, 2)
        f.seek(max(0, size - len(PNG_END)))
        tail = f.read()
    if head.startswith(JPEG_START):
        if tail.endswith(JPEG_END) or _jpeg_reaches_eoi(path):
            return None
        what = "the JPEG end-of-image marker FF D9"
    elif head == PNG_START:
        if tail == PNG_END or _png_reaches_iend(path, size):
            return None
        what = "the PNG end chunk IEND"
    else:
        return None
    return f"not a readable image (truncated: its {size} bytes end without {what})"


def _jpeg_reaches_eoi(path: Path) -> bool:
    """Whether the segments of a JPEG lead to its EOI marker (the slow path of `truncation`: reads the whole file)."""
    data = Path(path).read_bytes()
    n, i = len(data), 2
    while True:
        i = data.find(b"\xff", i)  # the next marker; libjpeg skips stray bytes before one the same way
        while 0 <= i < n and data[i] == 0xFF:  # fill bytes before the marker code
            i += 1
        if i < 0 or i >= n:
            return False
        code = data[i]
        i += 1
        if code == 0xD9:
            return True
        if code in (0x00, 0x01) or 0xD0 <= code <= 0xD7:  # TEM and RSTn stand alone (and FF 00 is no marker)
            continue
        if i + 2 > n:
            return False
        i += int.from_bytes(data[i:i + 2], "big")  # the length counts its own two bytes
        if code == 0xDA:  # SOS: entropy-coded data up to the next marker that is not a stuffed 00 or an RSTn
            while True:
                j = data.find(b"\xff", i)
                if j < 0 or j + 1 >= n:
                    return False
                if data[j + 1] == 0x00 or 0xD0 <= data[j + 1] <= 0xD7:
                    i = j + 2
                    continue
                i = j
                break


def _png_reaches_iend(path: Path, size: int) -> bool:
    """Whether the chunks of a PNG lead to a complete IEND chunk (lengths only: seeks, no chunk data is read)."""
    with open(path, "rb") as f:
        at = len(PNG_START)
        while at + 12 <= size:
            f.seek(at)
            length, kind = int.from_bytes(f.read(4), "big"), f.read(4)
            at += 12 + length  # length, type, data, CRC
            if kind == b"IEND":
                return at <= size
    return False


def probe(path: Path) -> tuple[Optional[tuple[int, int]], Optional[str]]:
    """((height, width), None) of a readable image, else (None, what is wrong). Reads the header and the last bytes
    (`truncation`: a truncated JPEG decodes, grey at the bottom), and for a PNG also walks its chunks and checksums."""
    path = Path(path)
    if not path.is_file():
        return None, not_a_file(path)
    try:
        cut = truncation(path)
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    if cut:
        return None, cut
    try:
        from PIL import Image
    except ImportError:  # Pillow is not a dependency of the library (ComfyUI has it): decode with OpenCV instead
        return _probe_decoding(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.format == "PNG":
                im.verify()
    except Image.DecompressionBombError as e:
        return None, f"too large to open safely ({e}), downscale it"
    except Image.UnidentifiedImageError:  # its message repeats the path
        return None, "not a readable image (empty, damaged, or not an image)"
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports bad data as any of these
        return None, f"not a readable image ({e})"
    if w <= 0 or h <= 0:
        return None, f"has no pixels ({w}x{h})"
    return (h, w), None


def _probe_decoding(path: Path) -> tuple[Optional[tuple[int, int]], Optional[str]]:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        return None, "not a readable image (OpenCV cannot decode it)"
    return (img.shape[0], img.shape[1]), None


def check_files(root: Path, samples: Sequence, derive_conditions: bool = False) -> tuple[list[tuple[int, int]], list[tuple[Path, str]]]:
    """The (height, width) of every sample's image (None where unreadable), and the problems of all files: unreadable,
    above the stored-file limit, or a condition whose size is not its image's (the pairing rule of `ControlDataset`)."""
    file_mp = megapixel_limit(*FILE_LIMIT)
    sizes: list = []
    problems: list[tuple[Path, str]] = []
    seen: dict[Path, Optional[tuple[int, int]]] = {}

    def size_of(path: Path) -> Optional[tuple[int, int]]:
        if path not in seen:  # a condition file may serve several pairs; each file is named once
            hw, what = probe(path)
            if hw is not None and hw[0] * hw[1] / 1e6 > file_mp:
                what = (f"is {hw[1]}x{hw[0]} ({hw[0] * hw[1] / 1e6:.3g} megapixels), above the limit of {file_mp:g} megapixels "
                        f"for a stored image, which is decoded whole before resizing (downscale it, or raise the limit with "
                        f"the environment variable {FILE_LIMIT[0]}, memory permitting)")
                hw = None
            if what:
                problems.append((path, what))
            seen[path] = hw
        return seen[path]

    for s in samples:
        target = size_of(s.target)
        sizes.append(target)
        if derive_conditions:
            continue
        cond = size_of(s.condition)
        if target and cond and cond != target:
            problems.append((s.condition, f"is {cond[1]}x{cond[0]} but its image {_rel(s.target, root)} is {target[1]}x{target[0]} "
                                          "(a condition must have its image's size)"))
    return sizes, problems


def check_batches(root: Path, sizes: Sequence[tuple[int, int]], batch_size: int, files: Sequence[Path], how: str) -> None:
    """Refuse, before any batch is read, training sizes that cannot be stacked or that exceed the memory limits.

    sizes: each sample's (height, width) as training sees it (stored, square size or bucket); how: "stored",
    "size" or "buckets", for the advice. A batch must share one size: stored images of several sizes are refused
    with the sizes found (a size or buckets resize them), as a DatasetError. Then the largest training image against
    the per-image limit, and batch_size of them against the per-batch limit, as a LimitExceededError.
    """
    root = Path(root)
    if not sizes:
        return
    if how == "stored":
        counts = Counter(sizes)
        if len(counts) > 1:
            example = {hw: files[i] for i, hw in reversed(list(enumerate(sizes)))}
            found = ", ".join(f"{w}x{h}: {n} (e.g. {_rel(example[(h, w)], root)})" for (h, w), n in counts.most_common(MAX_LISTED))
            more = f", and {len(counts) - MAX_LISTED} more sizes" if len(counts) > MAX_LISTED else ""
            raise DatasetError(
                f"{root}: the images have {len(counts)} different sizes ({found}{more}), but a batch must share one size. "
                "Resize them to one size, or train with a square size (ControlDataset(size=...), the sd command's --resolution) "
                "or aspect-ratio buckets (ControlDataset(buckets=Buckets(...)); the ComfyUI Train node always uses them).")
    h, w = max(set(sizes), key=lambda hw: (hw[0] * hw[1], hw))
    mp = h * w / 1e6
    what = {"stored": "the stored size", "size": "the square training size", "buckets": "its largest bucket"}.get(how, "training size")
    image_mp = megapixel_limit(*IMAGE_LIMIT)
    if mp > image_mp:
        raise LimitExceededError(
            f"{root}: training at {w}x{h} ({what}) is {mp:.2f} megapixels per image, above the limit of {image_mp:g} megapixels "
            f"per image. {'Downscale the images or train at a smaller square size' if how == 'stored' else 'Lower the resolution'}, "
            f"or raise the limit with the environment variable {IMAGE_LIMIT[0]} (memory permitting).")
    batch_mp = megapixel_limit(*BATCH_LIMIT)
    if batch_size * mp > batch_mp:
        raise LimitExceededError(
            f"{root}: a batch of {batch_size} images at {w}x{h} ({what}) is {batch_size * mp:.1f} megapixels, above the limit of "
            f"{batch_mp:g} megapixels per batch. Lower the batch size (gradient accumulation keeps the effective batch) or the "
            f"resolution, or raise the limit with the environment variable {BATCH_LIMIT[0]} (memory permitting).")


__all__ = ["DatasetError", "MAX_LISTED", "FILE_LIMIT", "IMAGE_LIMIT", "BATCH_LIMIT", "dataset_error", "not_a_file", "probe",
           "truncation", "check_files", "check_batches"]
