"""Data and the output folder: data sets and their seeded splits (:mod:`.datasets`), the workspace
every stage reads and writes (:mod:`.workspace`), and what the stages left in it, read back
(:mod:`.artifacts`)."""
