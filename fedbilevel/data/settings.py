"""Run-config options of the federations (pure Python: no loader is imported)."""

from __future__ import annotations

from dataclasses import dataclass

from fedbilevel.options import (
    choice,
    integer,
    name_list,
    not_allowed,
    number,
    option,
    text,
    validate,
)

# Every ``data`` value has a loader in fedbilevel.data.DATA_LOADERS (a test keeps them equal).
DATA_SOURCES = ("synthetic", "flan-json", "hub", "digits")
IMAGE_DATA = frozenset({"digits"})  # the others hold text, except hub with an image-column
SYNTHETIC_INSTRUCTIONS = ("shared", "per-task")
SYNTHETIC_SPLITS = ("task", "iid")
PARTITIONERS = ("natural", "dirichlet", "iid")


@dataclass(frozen=True)
class DataSettings:
    """Which federation each client loads its partition of, and how it is split.

    Cross-field rules (one line naming the key when broken): ``flan-json`` needs ``data-path``,
    ``hub`` needs ``hub-dataset`` and, unless IID, ``partition-by``; ``clients-per-task`` above
    1 needs ``flan-json`` or hub natural ids; the IID synthetic split needs per-task instructions.
    """

    source: str = option(
        "data", "synthetic", choice(DATA_SOURCES), "federation: `synthetic`, `flan-json`, `hub` or `digits` (images)"
    )
    synthetic_tasks: tuple[str, ...] = option(
        "synthetic-tasks",
        ("reverse", "uppercase", "count", "initials"),
        name_list,
        "`synthetic`: tasks, assigned to clients in contiguous groups",
    )
    synthetic_instruction: str = option(
        "synthetic-instruction",
        "shared",
        choice(SYNTHETIC_INSTRUCTIONS),
        "`synthetic`: `shared` (one instruction for all tasks) or `per-task`",
    )
    synthetic_split: str = option(
        "synthetic-split",
        "task",
        choice(SYNTHETIC_SPLITS),
        "`synthetic`: `task` (one task per client) or `iid` (every client cycles through all tasks; needs `per-task`)",
    )
    synthetic_train_examples: int = option(
        "synthetic-train-examples", 48, integer(1), "`synthetic`: training examples per client"
    )
    synthetic_test_examples: int = option(
        "synthetic-test-examples", 32, integer(1), "`synthetic`: test examples per client"
    )
    data_path: str = option(
        "data-path",
        "",
        text(empty_ok=True),
        "`flan-json`: the folder (relative paths: to `$FEDBILEVEL_OUTPUT_ROOT`, else the working folder)",
    )
    max_train_examples: int = option(
        "max-train-examples",
        0,
        integer(0),
        "`flan-json` / `hub`: keep at most this many per client, "
        "a seeded subset that is the same for every strategy (0: all)",
    )
    max_test_examples: int = option(
        "max-test-examples", 0, integer(0), "`flan-json` / `hub`: keep at most this many test items per client (0: all)"
    )
    clients_per_task: int = option(
        "clients-per-task",
        1,
        integer(1),
        "`flan-json`: k clients a task, partition p holding a seeded IID share of the training and test items "
        "of file p // k (num-partitions = files × k); `hub` with `partitioner='natural'`: k clients a natural id "
        "(1: num-partitions / ids)",
    )
    hub_dataset: str = option("hub-dataset", "", text(empty_ok=True), "`hub`: dataset name")
    hub_subset: str = option("hub-subset", "", text(empty_ok=True), "`hub`: the dataset's configuration")
    hub_train_split: str = option("hub-train-split", "train", text(empty_ok=False), "`hub`: the training split")
    hub_test_split: str = option(
        "hub-test-split", "", text(empty_ok=True), "`hub`: the test split (none: `test-fraction` of each client's rows)"
    )
    partitioner: str = option(
        "partitioner",
        "natural",
        choice(PARTITIONERS),
        "`hub`: one client per value of a column (`natural`), Dirichlet(α) over a column, or `iid`",
    )
    partition_by: str = option("partition-by", "", text(empty_ok=True), "`hub`: the column the partitioner reads")
    dirichlet_alpha: float = option(
        "dirichlet-alpha", 0.5, number(0.0, low_open=True), "`hub`: α of the Dirichlet partitioner"
    )
    instruction_column: str = option(
        "instruction-column", "instruction", text(empty_ok=False), "`hub`: the instruction column"
    )
    input_column: str = option("input-column", "", text(empty_ok=True), "`hub`: a column appended to the instruction")
    output_column: str = option("output-column", "output", text(empty_ok=False), "`hub`: the answer column")
    task_column: str = option("task-column", "", text(empty_ok=True), "`hub`: the task label column")
    image_column: str = option(
        "image-column",
        "",
        text(empty_ok=True),
        "`hub` image datasets: the image column (non-empty: a federation of images)",
    )
    label_column: str = option(
        "label-column", "label", text(empty_ok=False), "`hub` image datasets: the class-index column"
    )
    test_fraction: float = option(
        "test-fraction",
        0.2,
        number(0.0, low_open=True, high=1.0),
        "`hub` without a test split, and `digits`: held-out share",
    )
    val_fraction: float = option(
        "val-fraction",
        0.0,
        number(0.0, low_open=False, high=1.0),
        "share of each client's training examples held out as its validation split (a seeded draw, the same for "
        "every strategy; after `max-train-examples`), never trained on and never test items: what `eval-split = "
        "'validation'` scores (scripts/tune.py); 0: none, the data unchanged",
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.source == "flan-json" and not self.data_path:
            raise not_allowed("data-path", "", "with data='flan-json' name the folder")
        if self.source == "hub" and not self.hub_dataset:
            raise not_allowed("hub-dataset", "", "with data='hub' name the dataset")
        if self.source == "hub" and self.partitioner != "iid" and not self.partition_by:
            raise not_allowed("partition-by", "", f"with partitioner='{self.partitioner}' name the column")
        if self.clients_per_task > 1 and not (
            self.source == "flan-json" or (self.source == "hub" and self.partitioner == "natural")
        ):
            where = f"partitioner='{self.partitioner}'" if self.source == "hub" else f"data='{self.source}'"
            raise not_allowed(
                "clients-per-task",
                self.clients_per_task,
                f"with {where} use 1; it splits the tasks of data='flan-json' and of hub natural ids "
                "(the synthetic tasks and digits domains go to num-partitions / tasks clients each already)",
            )
        if self.source == "synthetic" and self.synthetic_split == "iid" and self.synthetic_instruction != "per-task":
            raise not_allowed(
                "synthetic-split",
                "iid",
                "with synthetic-instruction='shared' use 'per-task' "
                "(with one instruction for all tasks they cannot be told apart)",
            )

    def without_tasks(self) -> str | None:
        """Why the clients of this federation hold no task of their own, or no other task to be scored on
        (``eval-cross`` needs both), or None.

        Each client holds one task with the synthetic task split (contiguous groups), flan-json (a
        category per file) and hub text data partitioned by natural id (the id, or the ``task-column``
        label); the synthetic IID split, hub Dirichlet or IID shards and image federations do not.
        """
        if self.holds_images:
            return f"data='{self.source}' holds images (a domain per client), not text tasks"
        if self.source == "synthetic" and self.synthetic_split == "iid":
            return "synthetic-split='iid' gives every client every task"
        if self.source == "synthetic" and len(set(self.synthetic_tasks)) < 2:
            return f"synthetic-tasks={','.join(self.synthetic_tasks)!r} is one task: there is no other task to score"
        if self.source == "hub" and self.partitioner != "natural":
            return f"partitioner='{self.partitioner}' gives the clients no task of their own"
        return None

    @property
    def holds_images(self) -> bool:
        """Whether the federation holds images (scored by accuracy and macro F1) rather than text."""
        return self.source in IMAGE_DATA or (self.source == "hub" and bool(self.image_column))
