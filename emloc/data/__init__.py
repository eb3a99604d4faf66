"""Task data: built-in seeded tasks (:mod:`.tasks`), user JSONL/CSV files (:mod:`.files`), and chat-template
text and tokens (:mod:`.encoding`). Every public name is re-exported here: ``from emloc.data import X``.

An :class:`Example` is a ``prompt`` and a ``response``; a :class:`TaskData` has train, calibration and test
splits plus the task's answer checker. Loss is taken on response tokens only.
"""
from emloc.data.encoding import (IGNORE_INDEX, PaddingCollator, chat_messages, count_truncated,
                                 encode_example, encode_examples, hygiene_line, longest_lengths, pad_batch,
                                 prompt_text, response_text, response_window_batch)
from emloc.data.files import USER_TASK, load_task_data, load_user_data, read_examples
from emloc.data.tasks import (ADDITION_TEMPLATES, TASKS, Example, Task, TaskData, calibration_subset,
                              first_line, make_task_data)

__all__ = ["IGNORE_INDEX", "PaddingCollator", "chat_messages", "count_truncated", "hygiene_line",
           "encode_example", "encode_examples", "longest_lengths", "pad_batch",
           "prompt_text", "response_text", "response_window_batch", "USER_TASK", "load_task_data",
           "load_user_data", "read_examples", "ADDITION_TEMPLATES", "TASKS", "Example", "Task", "TaskData",
           "calibration_subset", "first_line", "make_task_data"]
