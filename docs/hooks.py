"""mkdocs hooks: the config reference generated from the job dataclasses, and the study plots served from the repo.

The reference comes from ``pipeline.config_loading.describe_keys``, the same rows ``distillery <stage> --help``
prints (``pipeline.cli.keys_help``), so the site and ``--help`` cannot drift apart from the code. The plots live in
``study-results/`` beside the code that writes them; pages link them as ``../study-results/...`` (which also works
on GitHub) and this hook serves them inside the site.
"""
from __future__ import annotations

import html
import re
from pathlib import Path

MARKER = "<!-- config-reference -->"
ROOT = Path(__file__).resolve().parent.parent
STUDY_RESULTS = "study-results"


def jobs() -> list[tuple[str, type, str]]:
    """``(command, job class, what it runs)`` for every stage parser of ``pipeline/cli.py``."""
    from pipeline.cache.config import CacheJob
    from pipeline.generate.config import GenerateJob
    from pipeline.rounds.config import RunJob
    from pipeline.train.config import PretrainJob, TrainJob

    return [("cache", CacheJob, "`distillery cache` and `distillery prepare`: stage 1, the teacher pass"),
            ("generate", GenerateJob, "`distillery generate`: a model's completions of prompts"),
            ("train", TrainJob, "`distillery train`: stage 2, a student from a cache"),
            ("pretrain", PretrainJob, "`distillery pretrain`: cross-entropy on raw text"),
            ("run", RunJob, "`distillery run`: stage 3, rounds of (generate,) cache and train")]


def _inline(text: str) -> str:
    """A docstring as HTML: escaped, with reST ``literals`` as <code>."""
    return re.sub(r"``(.+?)``", r"<code>\1</code>", html.escape(text))


def render_job(command: str, job_class: type, text: str) -> str:
    """One job's section: a heading and an HTML table of (key, type, default, description)."""
    from pipeline.config_loading import describe_keys

    rows = "\n".join(f"<tr><td><code>{html.escape(key)}</code></td><td><code>{html.escape(type_name)}</code></td>"
                     f"<td><code>{html.escape(default)}</code></td><td>{_inline(doc)}</td></tr>"
                     for key, type_name, default, doc in describe_keys(job_class))
    return (f"## `{command}` ({job_class.__name__})\n\n{text}.\n\n<div class=\"config-keys\"><table>\n<thead><tr>"
            f"<th>key</th><th>type</th><th>default</th><th>description</th></tr></thead>\n<tbody>\n{rows}\n</tbody>\n"
            "</table></div>\n")


def render_config_reference() -> str:
    """Every job's section, in the order of the CLI's stages."""
    return "\n".join(render_job(*job) for job in jobs())


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Fill the config reference's marker; point ``../study-results/`` links at the copies served in the site."""
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, render_config_reference())
    if "/" not in page.file.src_uri:
        markdown = markdown.replace(f"](../{STUDY_RESULTS}/", f"]({STUDY_RESULTS}/")
    return markdown


def on_files(files, config):
    """Add the committed study plots to the site, at ``study-results/...``."""
    from mkdocs.structure.files import File

    for plot in sorted((ROOT / STUDY_RESULTS).rglob("*.png")):
        uri = plot.relative_to(ROOT).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(plot)))
    return files
