"""Entry point of the hf-fusion Space (``python spaces/app.py`` locally, ``app_file`` on Hugging Face Spaces)."""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for candidate in (HERE, HERE.parent):  # a deployed Space carries the package beside app.py; a checkout one level up
    if (candidate / "hf_fusion" / "__init__.py").is_file():
        sys.path.insert(0, str(candidate))
        break

from hf_fusion.allocator import keep_freed_memory  # noqa: E402
from hf_fusion.space import build_app, in_a_space, launch  # noqa: E402

keep_freed_memory()  # this process is the Space's own: merges reuse freed slice memory
demo = build_app()

if __name__ == "__main__":
    launch(
        demo=demo,
        host="0.0.0.0" if in_a_space() else os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )
