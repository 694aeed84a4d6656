"""The streaming fusion engine: plan the output, read tensors lazily, fuse slice by slice, write shards."""
