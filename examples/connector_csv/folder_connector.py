"""Read every CSV file under ./data: each subfolder is a prefix, each file a partition.

A file's fingerprint is its path, size and modification time, so a refresh
reads only the files that were added or changed since the last one, and drops
the rows of files that were deleted.
"""

from pathlib import Path


def context(credentials):
    # A real connector would build a client from its credentials here.
    return {"root": Path(__file__).parent / "data"}


def list_objects(context, metadata):
    root = context["root"]
    folder = root if metadata is None else root / metadata["name"]
    for entry in sorted(folder.iterdir()):
        relative = entry.relative_to(root).as_posix()
        if entry.is_dir():
            yield {"name": relative + "/", "fingerprint": None, "is_prefix": True}
        elif entry.suffix == ".csv":
            stat = entry.stat()
            yield {
                "name": relative,
                "fingerprint": f"{relative}@{stat.st_size}:{stat.st_mtime_ns}",
                "is_prefix": False,
            }


def read_bytes(context, metadata):
    with open(context["root"] / metadata["name"], "rb") as file:
        while chunk := file.read(64 * 1024):
            yield chunk
