"""`atlas site`: a self-contained static website over a run directory (see build.py)."""

from pipeline.site.build import SiteReport, build_site

__all__ = ["SiteReport", "build_site"]
