"""Files: reading what a user or a model directory names, writing atomically, and what a command may write.

* `files` - paths as typed (``~`` expanded), regular files only, nothing outside a model directory (`inside`,
  `within`), log appends that never follow a link.
* `atomic` - atomic writes: a crash leaves the previous file or the complete new one.
* `outputs` - output claims (a lock through ``filelock``), a command's own files only, never its own input.
"""
