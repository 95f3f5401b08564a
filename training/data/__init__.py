"""Prepared data: LeRobot -> encoded webdataset shards (prepare), and shards -> packed training
sequences (stream). `format.py` is the contract between the two."""
