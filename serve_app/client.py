"""Command-line client: ``python -m serve_app.client image|edit|video ...``.

Writes the returned PNG/MP4 to ``--out`` and prints where it wrote it and the
headers that say who served it (model, attempts, fallback depth, degradation,
adjustments, seed). Errors print the JSON error body and exit non-zero.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

import httpx

INFO_HEADERS = (
    "x-request-id",
    "x-model",
    "x-attempts",
    "x-fallback-depth",
    "x-degradation-level",
    "x-adjustments",
    "x-dropped-inputs",
    "x-seed",
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--out", "-o", required=True, type=Path, help="file to write the result to")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="genguard base URL (default: %(default)s)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int, dest="num_inference_steps")
    p.add_argument("--guidance", type=float, dest="guidance_scale")
    p.add_argument("--seed", type=int)
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--model", help="pin the first step of the chain")
    p.add_argument("--strict-fallback", action="store_true", help='send "fallback": "strict"')
    p.add_argument("--deadline", type=float, dest="deadline_s")
    p.add_argument("--timeout", type=float, default=600.0, help="HTTP client timeout, seconds")


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve_app.client", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    img = sub.add_parser("image", help="text-to-image (POST /v1/images)")
    _common(img)
    edit = sub.add_parser("edit", help="image edit (POST /v1/images/edits)")
    _common(edit)
    edit.add_argument("--image", required=True, type=Path, help="input image file")
    vid = sub.add_parser("video", help="text/image/trajectory-to-video (POST /v1/videos)")
    _common(vid)
    vid.add_argument("--frames", type=int, dest="num_frames")
    vid.add_argument("--fps", type=int)
    vid.add_argument("--image", type=Path, help="first frame (image-to-video)")
    vid.add_argument(
        "--trajectories",
        help='JSON list of tracks, e.g. \'[[[0.2,0.5],[0.8,0.5]]]\' (needs --image), or @file.json',
    )
    return parser


def request_of(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    fields = (
        "prompt", "width", "height", "num_inference_steps", "guidance_scale", "seed",
        "negative_prompt", "model", "deadline_s", "num_frames", "fps",
    )
    body = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    if args.strict_fallback:
        body["fallback"] = "strict"
    if getattr(args, "image", None) is not None:
        body["image"] = _b64(args.image)
    traj = getattr(args, "trajectories", None)
    if traj:
        text = Path(traj[1:]).read_text() if traj.startswith("@") else traj
        body["trajectories"] = json.loads(text)
    path = {"image": "/v1/images", "edit": "/v1/images/edits", "video": "/v1/videos"}[args.cmd]
    return path, body


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.out.parent.is_dir():
        parser.error(f"--out: folder {args.out.parent} does not exist")
    try:
        path, body = request_of(args)
    except FileNotFoundError as exc:
        parser.error(f"file not found: {exc.filename}")
    except json.JSONDecodeError as exc:
        parser.error(f"--trajectories is not valid JSON: {exc}")
    try:
        resp = httpx.post(args.url.rstrip("/") + path, json=body, timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"error: could not reach {args.url}: {exc}", file=sys.stderr)
        return 2
    if resp.status_code != 200:
        print(f"error: HTTP {resp.status_code}", file=sys.stderr)
        try:
            print(json.dumps(resp.json(), indent=2), file=sys.stderr)
        except ValueError:
            print(resp.text, file=sys.stderr)
        return 1
    args.out.write_bytes(resp.content)
    print(f"wrote {args.out} ({len(resp.content)} bytes, {resp.headers.get('content-type')})")
    for h in INFO_HEADERS:
        if h in resp.headers:
            print(f"{h}: {resp.headers[h]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
