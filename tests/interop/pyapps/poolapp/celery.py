from celery import Celery

app = Celery("poolapp", broker="amqp://guest:guest@127.0.0.1:1//")
app.conf.worker_pool = "gevent"
