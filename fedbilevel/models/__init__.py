"""Models, shared by server and client: the zoo (:mod:`.zoo`), base-model loading and
precision (:mod:`.base`), the LoRA adapter's input and output (:mod:`.adapter`), and the
run-config options of both (:mod:`.settings`, pure Python: importing it loads no torch)."""
