"""The demo: a spoken corpus made on the spot (espeak-ng + sox, held-out sentences and voices: ``corpus``), its
spoken conversations and text chats for data mixing (``mix``), and the ``salm-mtp make-demo-data`` command (``cli``).
It reads and writes manifests in the formats of salm_mtp.data and imports nothing above it."""
