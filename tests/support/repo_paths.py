"""Where the tests find the repository and their support modules, whatever folder under tests/ a test file is in
(one home, so moving a test file never breaks a path)."""

from __future__ import annotations

import os
from pathlib import Path

SUPPORT_DIR = os.path.dirname(os.path.abspath(__file__))
# tests/support/ -> tests/ -> the repository's root (README.md, docs/, infra/, jobs/, scripts/).
REPO_ROOT = os.path.dirname(os.path.dirname(SUPPORT_DIR))
REPO_PATH = Path(REPO_ROOT)
