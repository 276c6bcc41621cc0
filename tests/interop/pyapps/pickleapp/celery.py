from celery import Celery

app = Celery("pickleapp", broker="amqp://guest:guest@127.0.0.1:1//")
app.conf.accept_content = ["json", "pickle"]
app.conf.task_serializer = "pickle"
