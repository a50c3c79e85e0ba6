const email = event.user?.email ?? '';
if (email.endsWith('@disposable.example')) { api.deny('disposable-email-blocked'); return;}
