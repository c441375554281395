"""The stream processors, in dataflow order: diarize (audio -> segments, with its state store), match
(segments against the gallery table -> identified segments), requests (enroll and verify), sink
(results -> PostgreSQL). Which topics each reads and writes is declared in streams/topology.py."""
