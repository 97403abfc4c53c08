"""Embedded offline federation of synthetic instruction-following tasks.

Every client sees inputs from ONE distribution (3-5 common English words) but
each task asks for a different output, so a single global adapter cannot serve
all clients: that conflict is what personalised adapters are meant to resolve.
In the default ``"shared"`` instruction mode the instruction text is identical
for all tasks, so the task is only identifiable from the client's own data.

Everything is generated in code and is deterministic given the seed, so runs
need no network access or dataset download.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fedbilevel.data.common import check_int, check_partition
from fedbilevel.data.settings import SYNTHETIC_INSTRUCTIONS, SYNTHETIC_SPLITS
from fedbilevel.data.types import Example

# Short common lowercase ASCII words (3-6 letters): nouns, verbs, adjectives.
WORDS: tuple[str, ...] = tuple(
    (  # noqa: SIM905 (239 words read better as text than as a 239-line list)
        "ant apple arm baby back ball band bank bath bear bed bell belt bird boat body bone book boot bowl "
        "box boy bread brick bus cake call camp car card cat chair city clock cloud coat corn cow cup desk "
        "dog door dream drum duck egg farm fish flag floor flower food foot fork frog game gate girl glass "
        "goat gold grass hand hat head heart hill home horse house ice iron jam key king kite lake lamp leaf "
        "leg lion map milk moon mouse nest night nose oil owl page park pen pig pipe plant queen rain ring "
        "river road rock roof room rose salt sand ship shoe shop sky snow sock song star stone sun table tent "
        "tiger tooth town toy train tree truck wall water wind window wolf wood ask bake build buy carry "
        "catch clean climb cook cut dance draw drink drive eat fall fly give grow help hold jump kick laugh "
        "learn lift look make move open paint play pull push read ride run sail sing sit sleep smile swim "
        "talk throw walk wash write big blue bold brave bright busy calm cold cool dark deep dry early easy "
        "fast fine fresh funny glad good great green happy hard heavy high hot kind large late light long "
        "loud new nice old pink quick quiet red rich round sad safe sharp short slow small soft sweet tall "
        "thin tiny warm wet white wild wise young"
    ).split()
)

MIN_WORDS = 3
MAX_WORDS = 5


def _reverse(words: Sequence[str]) -> str:
    return " ".join(reversed(words))


def _uppercase(words: Sequence[str]) -> str:
    return " ".join(word.upper() for word in words)


def _count(words: Sequence[str]) -> str:
    return str(len(words))


def _initials(words: Sequence[str]) -> str:
    return " ".join(word[0] for word in words)


# Task name -> function(words) -> reference output. The order is the public
# task order (it fixes which clients get which task in task_of_client).
TASKS: dict[str, Callable[[Sequence[str]], str]] = {
    "reverse": _reverse,
    "uppercase": _uppercase,
    "count": _count,
    "initials": _initials,
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


SHARED_INSTRUCTION = "Transform the words: {words}"
PER_TASK_INSTRUCTIONS: dict[str, str] = {
    "reverse": "Reverse the order of the words: {words}",
    "uppercase": "Write the words in upper case: {words}",
    "count": "Count the words: {words}",
    "initials": "Write the first letter of each word: {words}",
}


def _check_tasks(tasks: Sequence[str] | str) -> tuple[str, ...]:
    """Validate task names; a string is read as a comma-separated list."""
    # Flower run-config values are scalars, so lists arrive as "a,b,c".
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    allowed = ", ".join(TASK_NAMES)
    if not names or names == [""]:
        raise ValueError(f"synthetic-tasks: {tasks!r}; allowed: one or more of {allowed}")
    seen: set[str] = set()
    for name in names:
        if name not in TASKS:
            raise ValueError(f"synthetic-tasks: unknown task {name!r}; allowed: {allowed}")
        if name in seen:
            raise ValueError(f"synthetic-tasks: duplicate task {name!r}; allowed: each of {allowed} at most once")
        seen.add(name)
    return tuple(names)


def _check_instruction(instruction: str) -> str:
    if instruction not in SYNTHETIC_INSTRUCTIONS:
        raise ValueError(f"synthetic-instruction: {instruction!r}; allowed: {', '.join(SYNTHETIC_INSTRUCTIONS)}")
    return instruction


def make_instruction(words: Sequence[str], task: str, instruction: str = "shared") -> str:
    """Build the instruction text for ``words``.

    Parameters
    ----------
    words : sequence of str
        The input words.
    task : str
        Task name, one of :data:`TASK_NAMES`.
    instruction : {"shared", "per-task"}
        ``"shared"`` gives every task the same text (the task is implicit);
        ``"per-task"`` states the task in the instruction.

    Returns
    -------
    str
        The instruction, e.g. ``"Transform the words: cat dog sun"``.

    Raises
    ------
    ValueError
        If ``task`` or ``instruction`` is not allowed.
    """
    _check_tasks([task])
    template = SHARED_INSTRUCTION if _check_instruction(instruction) == "shared" else PER_TASK_INSTRUCTIONS[task]
    return template.format(words=" ".join(words))


def make_example(words: Sequence[str], task: str, instruction: str = "shared") -> Example:
    """Build one :class:`Example` for ``words`` under ``task``.

    Parameters
    ----------
    words : sequence of str
        The input words.
    task : str
        Task name, one of :data:`TASK_NAMES`.
    instruction : {"shared", "per-task"}
        Instruction mode, see :func:`make_instruction`.

    Returns
    -------
    Example
        The instruction, the task's reference output and the task name.
    """
    return Example(
        instruction=make_instruction(words, task, instruction),
        output=TASKS[task](words),
        task=task,
    )


def task_of_client(partition_id: int, num_partitions: int, tasks: Sequence[str]) -> str:
    """Return the task assigned to a client.

    Clients are split into contiguous groups: the task index is
    ``partition_id * len(tasks) // num_partitions`` (8 clients, 4 tasks ->
    0, 0, 1, 1, 2, 2, 3, 3). With fewer clients than tasks some tasks get no
    client.

    Parameters
    ----------
    partition_id : int
        The client's partition, ``0 <= partition_id < num_partitions``.
    num_partitions : int
        Number of clients in the federation (>= 1).
    tasks : sequence of str or str
        Task names in order (a string is read as a comma-separated list).

    Returns
    -------
    str
        The task name.

    Raises
    ------
    ValueError
        One-line message naming the run-config key, value and allowed values.
    """
    names = _check_tasks(tasks)
    partition_id, num_partitions = check_partition(partition_id, num_partitions)
    return names[partition_id * len(names) // num_partitions]


def make_client_data(
    partition_id: int,
    num_partitions: int,
    *,
    seed: int,
    num_train: int,
    num_test: int,
    tasks: Sequence[str] | str = TASK_NAMES,
    instruction: str = "shared",
    split: str = "task",
) -> tuple[list[Example], list[Example]]:
    """Generate one client's train and test examples.

    The inputs depend only on ``(seed, partition_id)`` (through
    ``numpy.random.default_rng([seed, partition_id])``), not on the task or
    instruction mode, so different settings are compared on the same inputs.
    All inputs of a client are distinct: no test input (same words in the same
    order) appears in its train set.

    Parameters
    ----------
    partition_id : int
        The client's partition, ``0 <= partition_id < num_partitions``.
    num_partitions : int
        Number of clients in the federation (>= 1).
    seed : int
        Base seed (>= 0).
    num_train, num_test : int
        Number of train and test examples (each >= 1).
    tasks : sequence of str or str, optional
        Task names in order (a string is read as a comma-separated list);
        defaults to all of :data:`TASK_NAMES`.
    instruction : {"shared", "per-task"}, optional
        Instruction mode, see :func:`make_instruction`.
    split : {"task", "iid"}, optional
        ``"task"``: every example has the client's task (:func:`task_of_client`).
        ``"iid"``: the client's examples cycle through all tasks (no task structure across
        clients); needs ``instruction="per-task"``, since with one shared instruction the
        tasks could not be told apart.

    Returns
    -------
    tuple of (list of Example, list of Example)
        The train and test examples.

    Raises
    ------
    ValueError
        One-line message naming the run-config key, value and allowed values.
    """
    num_train = check_int("synthetic-train-examples", num_train, 1)
    num_test = check_int("synthetic-test-examples", num_test, 1)
    seed = check_int("seed", seed, 0)
    instruction = _check_instruction(instruction)
    if split not in SYNTHETIC_SPLITS:
        raise ValueError(f"synthetic-split: {split!r}; allowed: {', '.join(SYNTHETIC_SPLITS)}")
    if split == "iid" and instruction != "per-task":
        raise ValueError(
            "synthetic-split: 'iid' needs synthetic-instruction 'per-task'; "
            "with one shared instruction the tasks cannot be told apart"
        )
    names = _check_tasks(tasks)
    task = task_of_client(partition_id, num_partitions, names)

    rng = np.random.default_rng([seed, int(partition_id)])
    seen: set[tuple[str, ...]] = set()
    inputs: list[tuple[str, ...]] = []
    # Rejection sampling: with ~10^11 possible inputs duplicates are rare, so
    # this ends quickly while guaranteeing train/test separation.
    while len(inputs) < num_train + num_test:
        size = int(rng.integers(MIN_WORDS, MAX_WORDS + 1))
        words = tuple(WORDS[i] for i in rng.choice(len(WORDS), size=size, replace=False))
        if words not in seen:
            seen.add(words)
            inputs.append(words)

    if split == "iid":  # cycle through the tasks, starting at a per-client offset
        chosen = [names[(k + int(partition_id)) % len(names)] for k in range(len(inputs))]
    else:
        chosen = [task] * len(inputs)
    examples = [make_example(words, name, instruction) for words, name in zip(inputs, chosen)]
    return examples[:num_train], examples[num_train:]
