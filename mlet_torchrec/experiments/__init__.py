"""Experiments (the research layer): sweeps over configs, their reports and statistics, the compression and
hashing studies, and the demo. The library below never imports it."""
