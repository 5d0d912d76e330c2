"""Checkpoint I/O: model sources, a lazy index-checked reader, a streaming sharded writer."""
