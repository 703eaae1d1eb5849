package org.peersync.testserver;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.subscription.match.config.SubscriptionProcessorConfig;
import ca.uhn.fhir.jpa.subscription.submit.config.SubscriptionSubmitterConfig;
import ca.uhn.fhir.rest.server.RestfulServer;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.context.properties.EnableConfigurationProperties;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Import;

/**
 * Entry point of the peersync test FHIR server: a HAPI FHIR JPA server (R4) on H2 in memory,
 * served by embedded Tomcat at {@code http://127.0.0.1:<port>/fhir}.
 *
 * <p>HAPI's own JPA configuration ({@link JpaR4Config} and what it imports) provides the DAOs,
 * resource providers, validation chain and search machinery; {@link FhirServerBeans} adds the
 * beans a deployment must supply (storage settings, entity manager, paging, the servlet).
 * Auto-configurations that clash with HAPI are excluded in application.yaml.
 */
@SpringBootApplication
@EnableConfigurationProperties(FhirServerSettings.class)
@Import({
	JpaR4Config.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	SubscriptionSubmitterConfig.class,
	SubscriptionProcessorConfig.class,
	SubscriptionChannelConfig.class,
	FhirServerBeans.class
})
public class FhirTestServer {

	public static final String FHIR_PATH = "/fhir/*";

	public static void main(String[] args) {
		SpringApplication app = new SpringApplication(FhirTestServer.class);
		app.setRegisterShutdownHook(true);
		app.run(args);
	}

	/** SMART discovery while enforcement is on (an exact mapping wins over /fhir/*); a 404 otherwise. */
	@Bean
	public ServletRegistrationBean<SmartConfigurationServlet> smartConfigurationRegistration(FhirServerSettings theSettings) {
		FhirServerSettings.Auth auth = theSettings.getAuth();
		String tokenUrl = auth.isEnabled() ? auth.getTokenUrl() : "";
		ServletRegistrationBean<SmartConfigurationServlet> registration =
				new ServletRegistrationBean<>(new SmartConfigurationServlet(tokenUrl), "/fhir/.well-known/smart-configuration");
		registration.setName("smart-configuration");
		registration.setEnabled(tokenUrl != null && !tokenUrl.isBlank());
		return registration;
	}

	/** Serves the HAPI RestfulServer at /fhir/*; initialised at startup, not on the first request. */
	@Bean
	public ServletRegistrationBean<RestfulServer> fhirServletRegistration(RestfulServer theRestfulServer) {
		ServletRegistrationBean<RestfulServer> registration =
				new ServletRegistrationBean<>(theRestfulServer, FHIR_PATH);
		registration.setName("fhir");
		registration.setLoadOnStartup(1);
		return registration;
	}
}
