"""Register copies of one checkpoint as versions of its model: ``python -m bench.registry_worker '{...}'``.

For the model-cache memory row: the service loads registry versions asked for by id, so the
bench registers ``copies`` versions (one task, :func:`stepwise.registry.client.register_checkpoint`,
as training does) in the registry the environment points at — a throw-away embedded server.
Arguments: ``checkpoint``, ``copies``, ``project``, ``folder`` (where the copies' files go).
Prints ``{"ids": [...]}`` last.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any


def main() -> None:
    args: dict[str, Any] = json.loads(sys.argv[1])
    from clearml import Task

    from stepwise.export import export_checkpoint
    from stepwise.registry import client as registry
    from stepwise.train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args["checkpoint"])
    folder = Path(args["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    task = Task.init(project_name=args["project"], task_name="bench-model-cache", auto_connect_frameworks=False,
                     auto_resource_monitoring=False, output_uri=True, reuse_last_task_id=False)
    ids = []
    export_checkpoint(checkpoint, folder / "export")  # one export, registered beside every copy as training does
    try:
        for step in range(1, args["copies"] + 1):
            path = shutil.copyfile(args["checkpoint"], folder / f"step-{step:07d}.pt")  # one upload name per version
            ids.append(registry.register_checkpoint(
                task, path, name=checkpoint.config.name, step=step,
                metadata={"step": step, "config_hash": checkpoint.config.hash(),
                          "language_pair": checkpoint.config.data.language_pair}))
            export_dir = Path(shutil.copytree(folder / "export", folder / f"export-{step:07d}"))
            manifest = json.loads((export_dir / "manifest.json").read_text())
            manifest["source_model"] = {"id": ids[-1], "name": checkpoint.config.name, "project": task.project}
            (export_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
            registry.register_export(export_dir, manifest, task=task)
    finally:
        task.close()
    print(json.dumps({"ids": ids}))


if __name__ == "__main__":
    main()
