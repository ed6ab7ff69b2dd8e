"""VMBackups on the node agent: the loop (:mod:`.loop`) and the upload (:mod:`.upload`)."""
