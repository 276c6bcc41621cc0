"""An app whose import leaves a thread running, as some libraries do."""

import threading
import time

from celery import Celery

app = Celery("threadapp")
threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
